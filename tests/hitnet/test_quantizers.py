"""Quantizers: value sets, threshold semantics, BTQ unbiasedness and seeding, STE gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hitnet.quantizers import (
    ActivationQuantizer,
    QuantConfig,
    WeightQuantizer,
    quantize_uniform,
    set_activation_noise,
    straight_through,
    ternarize_bernoulli,
    ternarize_threshold,
)
from tests.hitnet.seeded import normal_tensor, seeds

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes, threshold=st.floats(0.0, 1.5))
def test_ttq_values_are_minus_alpha_zero_alpha_with_alpha_the_kept_mean(seed, shape, threshold):
    w = normal_tensor(seed, shape, 0.1)
    q = ternarize_threshold(w, threshold, scaled=True)
    delta = threshold * w.abs().mean()
    kept = w.abs() > delta
    if kept.any():
        alpha = w.abs()[kept].mean()
        assert torch.allclose(q[kept].abs(), alpha.expand(int(kept.sum())))
        assert torch.equal(torch.sign(q[kept]), torch.sign(w[kept]))
    assert torch.all(q[~kept] == 0)
    assert q.unique().numel() <= 3


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes, threshold=st.floats(0.0, 1.5))
def test_ttq_unscaled_is_exactly_sign_above_threshold(seed, shape, threshold):
    w = normal_tensor(seed, shape, 0.1)
    q = ternarize_threshold(w, threshold, scaled=False)
    expected = torch.where(w.abs() > threshold * w.abs().mean(), torch.sign(w), 0.0)
    assert torch.equal(q, expected)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes, threshold=st.floats(0.0, 1.5), scaled=st.booleans())
def test_ttq_per_row_is_ttq_of_each_row_on_its_own(seed, shape, threshold, scaled):
    w = normal_tensor(seed, shape, 0.1) * torch.rand(shape[0], 1) * 10  # rows of different scales
    q = ternarize_threshold(w, threshold, scaled=scaled, per_row=True)
    for row, quantized in zip(w, q, strict=True):
        assert torch.allclose(quantized, ternarize_threshold(row, threshold, scaled=scaled))


def test_ttq_per_row_example_by_hand():
    # row 0 as in the whole-tensor example below; row 1 is ten times larger: its own alpha
    w = torch.tensor([[-0.9, 0.1, 0.5, 0.1], [-9.0, 1.0, 5.0, 1.0]])
    assert torch.allclose(
        ternarize_threshold(w, 0.7, per_row=True),
        torch.tensor([[-0.7, 0.0, 0.7, 0.0], [-7.0, 0.0, 7.0, 0.0]]),
    )
    # one delta (0.7 * 2.2) for both rows: row 0 is all zeros, row 1 gets alpha 7 again
    whole = ternarize_threshold(w, 0.7, per_row=False)
    assert torch.allclose(whole, torch.tensor([[0.0] * 4, [-7.0, 0.0, 7.0, 0.0]]))


def test_ttq_threshold_zero_keeps_every_nonzero_weight_and_large_threshold_keeps_none():
    w = torch.tensor([[-0.3, 0.1], [0.2, -0.05]])
    assert torch.equal(ternarize_threshold(w, 0.0, scaled=False), torch.sign(w))
    assert torch.all(ternarize_threshold(w, 10.0, scaled=False) == 0)


def test_ttq_example_by_hand():
    # mean|w| = 0.4, delta = 0.7 * 0.4 = 0.28: keeps -0.9 and 0.5, alpha = 0.7
    w = torch.tensor([-0.9, 0.1, 0.5, 0.1])
    assert torch.allclose(ternarize_threshold(w, 0.7), torch.tensor([-0.7, 0.0, 0.7, 0.0]))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes)
def test_btq_values_are_ternary_and_signs_follow_input(seed, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    q = ternarize_bernoulli(x, generator=torch.Generator().manual_seed(seed + 1))
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.all((q == 0) | (torch.sign(q) == torch.sign(x)))


def test_btq_of_a_sigmoid_output_is_zero_or_one():
    p = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(3)))
    q = ternarize_bernoulli(p, generator=torch.Generator().manual_seed(4))
    assert set(q.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("x", [-1.0, -0.73, -0.2, 0.0, 0.05, 0.5, 0.91, 1.0])
def test_btq_is_unbiased_within_five_standard_errors(x):
    draws = 200_000
    q = ternarize_bernoulli(
        torch.full((draws,), x), generator=torch.Generator().manual_seed(int(1e3 * x) + 7)
    )
    # Var[q] = E[q^2] - E[q]^2 = |x| - x^2; the sample mean's standard error follows.
    standard_error = math.sqrt((abs(x) - x * x) / draws)
    assert abs(q.mean().item() - x) <= 5 * standard_error + 1e-12


def test_btq_is_reproducible_from_a_seed_and_varies_across_seeds():
    x = torch.rand(500) * 2 - 1
    a = ternarize_bernoulli(x, generator=torch.Generator().manual_seed(11))
    b = ternarize_bernoulli(x, generator=torch.Generator().manual_seed(11))
    c = ternarize_bernoulli(x, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_btq_given_uniform_draws_fires_exactly_where_draw_below_magnitude():
    x = torch.tensor([0.3, -0.3, 0.8, -0.8])
    uniform = torch.tensor([0.2, 0.4, 0.79, 0.81])
    assert torch.equal(ternarize_bernoulli(x, uniform=uniform), torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_btq_deterministic_rounds_to_nearest_ternary_value():
    x = torch.tensor([-0.9, -0.5, -0.49, 0.0, 0.3, 0.51, 1.0])
    q = ternarize_bernoulli(x, deterministic=True)
    assert torch.equal(q, torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes, bits=st.integers(1, 4))
def test_uq_values_lie_on_the_k_bit_grid_and_are_the_nearest_level(seed, shape, bits):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    q = quantize_uniform(x, bits)
    levels = torch.linspace(-1, 1, 2**bits)
    distance_to_grid = (q.unsqueeze(-1) - levels).abs().min(-1).values
    assert torch.all(distance_to_grid < 1e-6)
    nearest = levels[(x.clamp(-1, 1).unsqueeze(-1) - levels).abs().argmin(-1)]
    assert torch.allclose(q, nearest, atol=1e-6)


def test_uq_two_bit_levels():
    q = quantize_uniform(torch.tensor([-5.0, -0.4, -0.2, 0.2, 0.5, 3.0]), bits=2)
    assert torch.allclose(q, torch.tensor([-1.0, -1 / 3, -1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_straight_through_gradients():
    x = torch.tensor([-2.0, -0.6, 0.1, 0.4, 1.7], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])

    ternarize_threshold(x, 0.7).backward(upstream)
    assert torch.equal(x.grad, upstream)  # identity, even where the output is 0
    x.grad = None
    ternarize_bernoulli(x.clamp(-1, 1), generator=torch.Generator().manual_seed(0)).backward(
        upstream
    )
    assert torch.equal(x.grad, upstream * (x.detach().abs() <= 1))  # the clamp's own gradient
    x.grad = None
    quantize_uniform(x, 2).backward(upstream)
    assert torch.equal(x.grad, upstream * (x.detach().abs() <= 1))  # zero where clipped


def test_straight_through_returns_the_quantized_value_exactly():
    x = torch.tensor([0.3, -0.7], requires_grad=True)
    q = torch.tensor([1.0, -1.0])
    assert torch.equal(straight_through(x, q), q)


def test_quantizer_modules_follow_the_config():
    w = torch.randn(8, 8)
    assert torch.equal(WeightQuantizer(QuantConfig())(w), w)
    ternary = WeightQuantizer(QuantConfig(weight="ttq", ttq_scaled=False))(w)
    assert set(ternary.unique().tolist()) <= {-1.0, 0.0, 1.0}
    per_row = WeightQuantizer(QuantConfig(weight="ttq", ttq_per_row=True))(w)
    assert torch.equal(per_row, ternarize_threshold(w, 0.7, per_row=True))
    assert not torch.equal(per_row, ternarize_threshold(w, 0.7))
    config = QuantConfig(activation="btq", activations={"gates"}, btq_eval="deterministic")
    assert torch.equal(ActivationQuantizer(config, "hidden")(w), w)
    gates = ActivationQuantizer(config, "gates")
    p = torch.rand(4000)
    uniform = torch.rand(4000)
    assert torch.equal(gates(p, uniform), ternarize_bernoulli(p, uniform=uniform))  # training
    gates.eval()
    assert torch.equal(gates(p, uniform), ternarize_bernoulli(p, deterministic=True))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, scale=st.floats(0.01, 3.0))
def test_btq_of_weights_is_ternary_unbiased_on_the_clipped_weights_and_drawn_in_eval(
    seed, shape, scale
):
    w = normal_tensor(seed, shape, scale).requires_grad_()
    quantizer = WeightQuantizer(QuantConfig(weight="btq", btq_eval="deterministic")).eval()
    torch.manual_seed(seed)
    q = quantizer(w)
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.all((q == 0) | (torch.sign(q) == torch.sign(w.detach())))
    assert torch.all(q[w.detach().abs() >= 1] == torch.sign(w.detach()[w.detach().abs() >= 1]))
    torch.manual_seed(seed)
    assert torch.equal(quantizer(w), q)  # torch's global RNG draws, even in eval
    q.backward(torch.ones(shape))
    assert torch.equal(w.grad, (w.detach().abs() <= 1).float())  # the clip's gradient


def test_btq_of_weights_averages_to_the_clipped_weights():
    w = torch.tensor([-1.7, -0.6, -0.05, 0.0, 0.3, 0.9, 2.5])
    quantizer = WeightQuantizer(QuantConfig(weight="btq"))
    torch.manual_seed(0)
    mean = torch.stack([quantizer(w) for _ in range(20_000)]).mean(0)
    assert torch.allclose(mean, w.clamp(-1, 1), atol=0.02)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, level=st.floats(0.0, 1.0))
def test_warming_up_passes_that_fraction_of_the_noise_with_a_unit_gradient(seed, shape, level):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=generator) * 2 - 1).requires_grad_()
    uniform = torch.rand(shape, generator=generator)
    quantizer = ActivationQuantizer(QuantConfig(activation="btq"), "hidden")
    quantizer.set_noise_level(level)
    out = quantizer(x, uniform)
    ternary = ternarize_bernoulli(x.detach(), uniform=uniform)
    assert torch.allclose(out, x + level * (ternary - x), atol=1e-6)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.ones(shape))


def test_warming_up_at_level_one_is_plain_quantization_and_eval_is_never_mixed():
    x, uniform = torch.rand(500), torch.rand(500)
    quantizer = ActivationQuantizer(QuantConfig(activation="btq"), "gates")
    plain = quantizer(x, uniform)
    quantizer.set_noise_level(1.0)
    assert torch.equal(quantizer(x, uniform), plain)
    quantizer.set_noise_level(0.25)
    assert not torch.equal(quantizer(x, uniform), plain)
    quantizer.eval()  # validation and test see the fully ternary model
    assert torch.equal(quantizer(x, uniform), plain)
    with pytest.raises(ValueError, match=r"noise level must be in \[0, 1\], got 1.5"):
        quantizer.set_noise_level(1.5)


def test_set_activation_noise_reaches_every_activation_quantizer_and_no_state_dict():
    config = QuantConfig(activation="btq")
    model = torch.nn.ModuleList(
        [ActivationQuantizer(config, group) for group in ("gates", "candidate", "hidden")]
    )
    set_activation_noise(model, 0.4)
    assert [q.noise_level.item() for q in model] == pytest.approx([0.4] * 3)
    assert all(q.warming_up for q in model)
    assert model.state_dict() == {}  # checkpoints stay loadable by models without a warm-up


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": "fp4"}, "weight must be one of 'none', 'ttq', 'btq', 'uq', got 'fp4'"),
        ({"activations": {"gates", "cell"}}, "each of activations must be one of"),
        ({"ttq_threshold": -0.1}, "ttq_threshold must be in [0, 3], got -0.1"),
        ({"ttq_threshold": math.nan}, "ttq_threshold must be in [0, 3], got nan"),
        ({"uq_bits": 0}, "uq_bits must be in [1, 8], got 0"),
        ({"slope_gradient": "none"}, "slope_gradient must be one of 'sloped', 'unit'"),
        ({"btq_eval": "mean"}, "btq_eval must be one of 'stochastic', 'deterministic'"),
    ],
)
def test_quant_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=None) as error:
        QuantConfig(**kwargs)
    assert message in str(error.value)
