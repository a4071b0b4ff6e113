"""The study's measurements: quantization errors, levels, polarization, recorded activations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hitnet.analysis import (
    STUDIED_QUANTIZERS,
    ActivationRecorder,
    expected_btq_squared_error,
    histogram,
    near_a_ternary_level,
    pooled,
    quantizer_levels,
    record_activations,
    squared_error,
)
from hitnet.language_model import ModelConfig, RNNLanguageModel
from hitnet.quantizers import (
    QuantConfig,
    quantize_uniform,
    ternarize_bernoulli,
    ternarize_threshold,
)
from tests.hitnet.seeded import normal_tensor, seeds

shapes = st.tuples(st.integers(1, 30), st.integers(1, 30))
CONFIG = QuantConfig(ttq_threshold=0.5)


@pytest.mark.parametrize("x", [-2.0, -1.0, -0.6, -0.1, 0.0, 0.25, 0.5, 0.97, 1.4])
def test_btq_expected_error_is_the_mean_over_many_draws(x):
    draws = 100_000
    values = torch.full((draws,), x)
    q = ternarize_bernoulli(values.clamp(-1, 1), generator=torch.Generator().manual_seed(5))
    errors = (q - values).square()
    expected = expected_btq_squared_error(torch.tensor([x])).item()
    standard_error = errors.std().item() / math.sqrt(draws)
    assert abs(errors.mean().item() - expected) <= 5 * standard_error + 1e-6


def test_btq_expected_error_by_hand():
    x = torch.tensor([0.0, 0.5, -0.5, 1.0, 1.5])
    expected = torch.tensor([0.0, 0.25, 0.25, 0.0, 0.25])  # 1.5: clipped to 1, then 0.5^2
    assert torch.allclose(expected_btq_squared_error(x), expected)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, scale=st.floats(0.01, 2.0))
def test_squared_error_is_what_each_quantizer_of_the_layer_computes(seed, shape, scale):
    x = normal_tensor(seed, shape, scale)
    weights_ttq = ternarize_threshold(x, 0.5, scaled=True)
    activations_ttq = ternarize_threshold(x, 0.5, scaled=False)
    uq = quantize_uniform(x, 2)
    assert torch.allclose(squared_error(x, "ttq", CONFIG, True), (weights_ttq - x).square())
    assert torch.allclose(squared_error(x, "ttq", CONFIG, False), (activations_ttq - x).square())
    for weights in (True, False):
        assert torch.allclose(squared_error(x, "uq", CONFIG, weights), (uq - x).square())
        assert torch.equal(squared_error(x, "btq", CONFIG, weights), expected_btq_squared_error(x))


def test_activation_errors_ignore_which_groups_the_config_quantizes():
    x = torch.linspace(-1, 1, 11)
    gates_only = QuantConfig(activation="btq", activations={"gates"})
    assert torch.equal(
        squared_error(x, "uq", gates_only, False), squared_error(x, "uq", QuantConfig(), False)
    )
    assert squared_error(x, "uq", gates_only, False).sum() > 0


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, scale=st.floats(0.01, 2.0), bits=st.integers(1, 3))
def test_every_quantized_value_is_one_of_the_quantizers_levels(seed, shape, scale, bits):
    x = normal_tensor(seed, shape, scale)
    config = QuantConfig(uq_bits=bits, ttq_threshold=0.7)
    quantized = {
        ("uq", True): quantize_uniform(x, bits),
        ("uq", False): quantize_uniform(x, bits),
        ("ttq", True): ternarize_threshold(x, 0.7, scaled=True),
        ("ttq", False): ternarize_threshold(x, 0.7, scaled=False),
        ("btq", True): ternarize_bernoulli(x.clamp(-1, 1), generator=torch.Generator()),
        ("btq", False): ternarize_bernoulli(x.clamp(-1, 1), generator=torch.Generator()),
    }
    for (kind, weights), q in quantized.items():
        levels = torch.tensor(quantizer_levels(x, kind, config, weights))
        distance = (q.flatten().unsqueeze(-1) - levels).abs().min(-1).values
        assert torch.all(distance < 1e-6), (kind, weights)
    assert len(quantizer_levels(x, "uq", config, True)) == 2**bits


@settings(max_examples=60, deadline=None)
@given(seed=seeds, within=st.floats(0.01, 0.5))
def test_near_a_ternary_level_is_within_the_distance_of_the_nearest_of_three(seed, within):
    x = normal_tensor(seed, (50,), 1.0)
    distance = (x.unsqueeze(-1) - torch.tensor([-1.0, 0.0, 1.0])).abs().min(-1).values
    assert torch.equal(near_a_ternary_level(x, within), distance <= within)


def test_near_a_ternary_level_by_hand():
    x = torch.tensor([-1.3, -0.95, -0.5, 0.08, 0.2, 0.91, 1.05])
    expected = torch.tensor([False, True, False, True, False, True, True])
    assert torch.equal(near_a_ternary_level(x, 0.1), expected)


def test_histogram_counts_every_value_in_range_ends_included():
    x = torch.tensor([0.0, 0.1, 0.5, 0.99, 1.0, 2.0])
    counts = histogram(x, 4, 0.0, 1.0)
    assert counts.tolist() == [2.0, 0.0, 1.0, 2.0]  # 2.0 lies outside and is not counted


def _model(cell: str, quant: QuantConfig | None = None, slopes: float = 1.0) -> RNNLanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=30,
        cell=cell,
        embedding_size=6,
        hidden_size=5,
        dropout=0.0,
        quant=quant or QuantConfig(),
        lambda_sigma=slopes,
        lambda_tanh=slopes,
    )
    return RNNLanguageModel(config)


def _windows(count: int, steps: int = 7, batch: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tokens = torch.randint(0, 30, (count * steps + 1, batch), generator=torch.Generator())
    return [
        (tokens[i * steps : (i + 1) * steps], tokens[i * steps + 1 : (i + 1) * steps + 1])
        for i in range(count)
    ]


@pytest.mark.parametrize(("cell", "gates"), [("lstm", 3), ("gru", 2)])
def test_the_recorder_sees_every_activation_of_every_step(cell, gates):
    model = _model(cell)
    windows = _windows(2)
    stats = record_activations(model, windows, 10, 0.1, CONFIG)
    values = 2 * 7 * 3 * 5  # windows x steps x batch x units
    assert stats["gates"].count == gates * values
    assert stats["candidate"].count == stats["hidden"].count == values
    for group in stats.values():
        assert group.histogram.sum() == group.count  # every value lies in its group's range
        assert all(group.mse(kind) >= 0 for kind in STUDIED_QUANTIZERS)
    assert model.recurrent.uses_fused_kernel  # back on torch's kernel after recording


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_recorded_hidden_states_are_the_ones_the_layer_outputs(cell):
    model = _model(cell).eval()
    (window,) = _windows(1)
    with torch.no_grad():
        output, _ = model.recurrent(model.embedding(window[0]))  # torch's fused kernel
    stats = record_activations(model, [window], 16, 0.1, CONFIG)
    hidden = stats["hidden"]
    assert torch.equal(hidden.histogram, histogram(output, 16, -1.0, 1.0))
    # each step's h_t is quantized on its own (TTQ's threshold is that step's mean |h|)
    expected = {
        kind: sum(squared_error(h, kind, CONFIG, False).sum().item() for h in output)
        / output.numel()
        for kind in STUDIED_QUANTIZERS
    }
    assert {kind: hidden.mse(kind) for kind in STUDIED_QUANTIZERS} == pytest.approx(expected)
    assert hidden.polarized_fraction == pytest.approx(
        near_a_ternary_level(output, 0.1).float().mean().item()
    )


def test_a_sloping_factor_polarizes_the_activations_and_lowers_btqs_error():
    windows = _windows(3)
    by_slope = {
        slope: pooled(record_activations(_model("lstm", slopes=slope), windows, 10, 0.1, CONFIG))
        for slope in (1.0, 4.0)
    }
    assert by_slope[4.0].polarized_fraction > by_slope[1.0].polarized_fraction
    assert by_slope[4.0].mse("btq") < by_slope[1.0].mse("btq")


def test_the_recorder_sees_a_ternary_models_activations_before_quantization():
    quant = QuantConfig(weight="ttq", activation="btq", btq_eval="deterministic")
    model = _model("lstm", quant)
    stats = record_activations(model, _windows(1), 20, 0.1, CONFIG)
    assert stats["candidate"].polarized_fraction < 1.0  # not only -1, 0 and 1


def test_the_recorder_restores_a_compiled_recurrence_and_removes_its_hooks():
    model = _model("gru", QuantConfig(weight="ttq", activation="btq"))
    model.recurrent.compile_recurrence("default")
    compiled = model.recurrent._run_layer
    with ActivationRecorder(model, CONFIG, 5, 0.1):
        assert model.recurrent.compile_mode is None
    assert model.recurrent.compile_mode == "default"
    assert model.recurrent._run_layer is compiled  # the same one: nothing to compile again
    assert not model.recurrent.hidden_quantizer._forward_hooks
