"""Sloped LSTM/GRU: exact equivalence with torch's layers, layout, slopes, real ternarity."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hitnet.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer
from hitnet.recurrent import (
    Cell,
    SlopedGRU,
    SlopedLSTM,
    gru_accumulator_step,
    gru_step,
    sloped,
)

TORCH_LAYER = {SlopedLSTM: torch.nn.LSTM, SlopedGRU: torch.nn.GRU}
TERNARY = QuantConfig(weight="ttq", activation="btq")


def _pair(cls, input_size, hidden_size, num_layers, seed):
    torch.manual_seed(seed)
    reference = TORCH_LAYER[cls](input_size, hidden_size, num_layers=num_layers)
    layer = cls(input_size, hidden_size, num_layers=num_layers, fused_full_precision=False)
    layer.load_state_dict(reference.state_dict())
    return reference, layer


def _initial_state(cls, num_layers, batch, hidden_size):
    h = torch.randn(num_layers, batch, hidden_size)
    return (h, torch.randn(num_layers, batch, hidden_size)) if cls is SlopedLSTM else h


def _flat(state):
    return torch.cat([s.flatten() for s in state]) if isinstance(state, tuple) else state.flatten()


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
@settings(max_examples=15, deadline=None)
@given(
    seq_len=st.integers(1, 12),
    batch=st.integers(1, 6),
    input_size=st.integers(1, 16),
    hidden_size=st.integers(1, 16),
    num_layers=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_reference_loop_matches_torch_outputs_states_and_gradients(
    cls, seq_len, batch, input_size, hidden_size, num_layers, seed
):
    reference, layer = _pair(cls, input_size, hidden_size, num_layers, seed)
    x = torch.randn(seq_len, batch, input_size)
    state = _initial_state(cls, num_layers, batch, hidden_size)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()

    out_ref, state_ref = reference(x_ref, state)
    out_ours, state_ours = layer(x_ours, state)
    assert (out_ref - out_ours).abs().max() < 1e-5
    assert (_flat(state_ref) - _flat(state_ours)).abs().max() < 1e-5

    weights = torch.randn_like(out_ref)
    ((out_ref * weights).sum() + _flat(state_ref).sum()).backward()
    ((out_ours * weights).sum() + _flat(state_ours).sum()).backward()
    assert (x_ref.grad - x_ours.grad).abs().max() < 1e-5
    for name, param in reference.named_parameters():
        ours = dict(layer.named_parameters())[name]
        assert (param.grad - ours.grad).abs().max() < 1e-5, name


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
def test_parameter_layout_is_torchs_so_checkpoints_load_both_ways(cls):
    reference = TORCH_LAYER[cls](5, 7, num_layers=2)
    ternary = cls(5, 7, num_layers=2, quant=TERNARY, lambda_sigma=3.0, lambda_tanh=2.0)
    assert list(ternary.state_dict()) == list(reference.state_dict())
    ternary.load_state_dict(reference.state_dict())
    reference.load_state_dict(ternary.state_dict())


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
def test_fused_default_path_equals_reference_loop(cls):
    torch.manual_seed(0)
    fused = cls(6, 8, num_layers=2)
    loop = cls(6, 8, num_layers=2, fused_full_precision=False)
    loop.load_state_dict(fused.state_dict())
    assert fused.uses_fused_kernel and not loop.uses_fused_kernel
    x = torch.randn(9, 3, 6)
    assert (fused(x)[0] - loop(x)[0]).abs().max() < 1e-5


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
def test_slopes_change_the_function_and_scale_preactivations(cls):
    torch.manual_seed(1)
    plain = cls(4, 5)
    sloped = cls(4, 5, lambda_sigma=2.0, lambda_tanh=1.0)
    assert not sloped.uses_fused_kernel
    sloped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 2, 4)
    assert (plain(x)[0] - sloped(x)[0]).abs().max() > 1e-3
    # sigmoid(2 * (Wx + b)) == sigmoid(W'x + b') with W' = 2W, b' = 2b for the gates only.
    doubled = cls(4, 5, fused_full_precision=False)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    hidden = plain.hidden_size
    gate_rows = (
        [slice(0, 2 * hidden), slice(3 * hidden, 4 * hidden)]  # LSTM i, f, o
        if cls is SlopedLSTM
        else [slice(0, 2 * hidden)]  # GRU r, z
    )
    for tensor in state.values():
        for rows in gate_rows:
            tensor[rows] *= 2.0
    doubled.load_state_dict(state)
    assert (doubled(x)[0] - sloped(x)[0]).abs().max() < 1e-5


def _record_outputs(layer):
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(module, inputs, output):
        seen.setdefault(getattr(module, "group", "weights"), []).append(output.detach())

    for module in (
        layer.weight_quantizer,
        layer.gate_quantizer,
        layer.candidate_quantizer,
        layer.hidden_quantizer,
    ):
        module.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
@pytest.mark.parametrize("train", [True, False])
def test_ternary_forward_really_uses_ternary_weights_and_activations(cls, train):
    torch.manual_seed(2)
    config = QuantConfig(weight="ttq", activation="btq", ttq_scaled=False)
    layer = cls(6, 10, num_layers=2, quant=config, lambda_sigma=2.0, lambda_tanh=2.0)
    layer.train(train)
    seen = _record_outputs(layer)
    output, _ = layer(torch.randn(7, 4, 6))

    gates_per_step = 3 if cls is SlopedLSTM else 2
    assert len(seen["weights"]) == 2 * 2  # W_ih and W_hh of both layers
    assert len(seen["gates"]) == 7 * 2 * gates_per_step
    assert len(seen["candidate"]) == len(seen["hidden"]) == 7 * 2
    for group, outputs in seen.items():
        values = set(torch.cat([o.flatten() for o in outputs]).unique().tolist())
        allowed = {0.0, 1.0} if group == "gates" else {-1.0, 0.0, 1.0}
        assert values <= allowed, group
        assert len(values) >= 2, group  # not degenerate
    assert set(output.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_ttq_scaled_weights_take_three_values_per_matrix():
    layer = SlopedLSTM(6, 10, quant=QuantConfig(weight="ttq"))
    seen = _record_outputs(layer)
    layer(torch.randn(2, 1, 6))
    for weight in seen["weights"]:
        alpha = weight.abs().max()
        assert set(weight.unique().tolist()) <= {-alpha.item(), 0.0, alpha.item()}


def test_only_configured_activations_are_quantized():
    config = QuantConfig(weight="none", activation="btq", activations={"hidden"})
    layer = SlopedLSTM(4, 8, quant=config)
    seen = _record_outputs(layer)
    layer(torch.randn(5, 3, 4))
    gates = torch.cat([g.flatten() for g in seen["gates"]])
    assert not set(gates.unique().tolist()) <= {0.0, 1.0}
    assert set(torch.cat(seen["hidden"]).unique().tolist()) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
def test_btq_noise_is_reproducible_from_a_generator(cls):
    layer = cls(4, 8, quant=TERNARY)
    x = torch.randn(5, 3, 4)
    a = layer(x, generator=torch.Generator().manual_seed(5))[0]
    b = layer(x, generator=torch.Generator().manual_seed(5))[0]
    c = layer(x, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_deterministic_evaluation_ignores_the_generator():
    layer = SlopedGRU(
        4, 8, quant=QuantConfig(weight="ttq", activation="btq", btq_eval="deterministic")
    )
    layer.eval()
    x = torch.randn(5, 3, 4)
    a = layer(x, generator=torch.Generator().manual_seed(5))[0]
    b = layer(x, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
def test_ternary_layer_passes_gradients_to_shadow_weights(cls):
    layer = cls(4, 8, quant=TERNARY)
    output, _ = layer(torch.randn(5, 3, 4))
    output.sum().backward()
    assert layer.weight_hh_l0.grad.abs().sum() > 0
    assert layer.weight_ih_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [torch.sigmoid, torch.tanh])
@pytest.mark.parametrize("unit", [False, True], ids=["sloped-gradient", "unit-gradient"])
def test_sloped_activation_value_is_fn_of_slope_x_and_gradient_follows_the_mode(fn, unit):
    x = torch.linspace(-3, 3, 41, requires_grad=True)
    y = sloped(fn, x, 2.0, unit)
    assert torch.equal(y, fn(2.0 * x.detach()))
    y.sum().backward()
    probe = x.detach().clone().requires_grad_()
    (fn(probe) if unit else fn(2.0 * probe)).sum().backward()
    assert torch.allclose(x.grad, probe.grad)


@pytest.mark.parametrize("cls", [SlopedLSTM, SlopedGRU])
def test_unit_slope_gradient_keeps_the_forward_pass_and_shrinks_the_gradient(cls):
    x = torch.randn(30, 4, 8, generator=torch.Generator().manual_seed(1))
    outputs, grad_norms = {}, {}
    for mode in ("sloped", "unit"):
        torch.manual_seed(0)
        quant = QuantConfig(weight="ttq", activation="btq", slope_gradient=mode)
        layer = cls(8, 16, quant=quant, lambda_sigma=2.0, lambda_tanh=2.0)
        outputs[mode], _ = layer(x, generator=torch.Generator().manual_seed(3))
        outputs[mode].sum().backward()
        grad_norms[mode] = layer.weight_hh_l0.grad.norm()
    assert torch.equal(outputs["sloped"], outputs["unit"])
    assert 0 < grad_norms["unit"] < grad_norms["sloped"]


def test_bad_shapes_and_slopes_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match=r"expects input of shape \(seq_len, batch, 4\)"):
        SlopedLSTM(4, 8)(torch.randn(3, 5))
    for slopes in ({"lambda_sigma": -1.0}, {"lambda_sigma": math.nan}, {"lambda_tanh": math.inf}):
        with pytest.raises(ValueError, match="sloping factors must be finite and > 0"):
            SlopedGRU(4, 8, **slopes)
    with pytest.raises(ValueError, match=r"ttq_threshold must be in \[0, 3\], got nan"):
        QuantConfig(weight="ttq", ttq_threshold=math.nan)


TERNARY = QuantConfig(weight="ttq", activation="btq", btq_eval="deterministic")


@pytest.mark.parametrize("quant", [QuantConfig(), TERNARY], ids=["fused", "reference"])
def test_a_state_of_the_wrong_shape_is_rejected_not_broadcast(quant):
    """Fault: an LSTM h_0 of shape (B, H) was taken, its row 0 used for every sample; one
    for 2 layers on a 1-layer module was taken, its second layer ignored."""
    lstm, gru, x = SlopedLSTM(4, 8, quant=quant), SlopedGRU(4, 8, quant=quant), torch.randn(6, 3, 4)
    for bad in (torch.zeros(3, 8), torch.zeros(2, 3, 8), torch.zeros(1, 2, 8)):
        with pytest.raises((ValueError, RuntimeError), match=r"(?i)expected .*(h_0|hidden)"):
            lstm(x, (bad, torch.zeros(1, 3, 8)))
        with pytest.raises((ValueError, RuntimeError), match=r"(?i)expected .*(h_0|hidden)"):
            gru(x, bad)


def test_batch_first_set_after_construction_is_refused_not_ignored():
    layer = SlopedLSTM(4, 8, quant=TERNARY)
    layer.batch_first = True
    with pytest.raises(ValueError, match="sequence-first: batch_first must be False"):
        layer(torch.randn(6, 3, 4))


def test_a_new_quant_config_takes_effect_at_once():
    """Fault: reassigning ``quant`` turned the fused path off, but the quantizers kept the
    old (full-precision) config: the output stayed silently full precision."""
    torch.manual_seed(0)
    layer, x = SlopedLSTM(4, 8), torch.randn(6, 3, 4)
    fresh = SlopedLSTM(4, 8, quant=TERNARY)
    fresh.load_state_dict(layer.state_dict())
    layer.quant = TERNARY
    layer.eval(), fresh.eval()
    assert not layer.uses_fused_kernel
    assert torch.equal(layer(x)[0], fresh(x)[0])
    assert set(layer(x)[0].unique().tolist()) <= {-1.0, 0.0, 1.0}  # ternary h


def test_gru_accumulator_without_quantization_is_torchs_gru():
    torch.manual_seed(0)
    reference = torch.nn.GRU(4, 8, num_layers=2)
    layer = SlopedGRU(4, 8, num_layers=2, quant=QuantConfig(gru_accumulator=True))
    layer.load_state_dict(reference.state_dict())
    assert not layer.uses_fused_kernel  # its state is a pair, not torch's tensor
    x, h0 = torch.randn(6, 3, 4), torch.randn(2, 3, 8)
    out_ref, h_ref = reference(x, h0)
    out, (h, memory) = layer(x, (h0, h0))
    assert (out - out_ref).abs().max() < 1e-5
    assert (h - h_ref).abs().max() < 1e-5 and (memory - h_ref).abs().max() < 1e-5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gru_accumulator_equals_the_plain_gru_when_gates_and_candidate_are_ternary(training):
    # Its memory (1 - z) * n + z * a then only ever holds -1, 0 or 1: nothing to keep.
    torch.manual_seed(0)
    plain = SlopedGRU(4, 8, quant=QuantConfig(weight="ttq", activation="btq"))
    accumulator = SlopedGRU(
        4, 8, quant=QuantConfig(weight="ttq", activation="btq", gru_accumulator=True)
    )
    accumulator.load_state_dict(plain.state_dict())
    plain.train(training), accumulator.train(training)
    x = torch.randn(20, 3, 4)
    out, _ = plain(x, generator=torch.Generator().manual_seed(1))
    out_acc, (_, memory) = accumulator(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, out_acc)
    assert set(memory.unique().tolist()) <= {-1.0, 0.0, 1.0}


def _hidden_only_cell(hidden: str) -> Cell:
    config = QuantConfig(activation="btq", activations={hidden} if hidden else set())
    quantizers = [ActivationQuantizer(config, group) for group in ("gates", "candidate", "hidden")]
    return Cell(WeightQuantizer(config), *quantizers, lambda_sigma=1.0, lambda_tanh=1.0)


def test_gru_accumulator_step_keeps_full_precision_memory_and_emits_ternary_h():
    torch.manual_seed(0)
    batch, hidden = 5, 7
    projected = torch.randn(batch, 3 * hidden)
    w_hh, b_hh = torch.randn(3 * hidden, hidden), torch.randn(3 * hidden)
    h_prev = torch.randint(-1, 2, (batch, hidden)).float()
    memory_prev = torch.rand(batch, hidden) * 2 - 1
    uniform = torch.rand(4, batch, hidden)

    h, (h_again, memory) = gru_accumulator_step(
        _hidden_only_cell("hidden"), projected, (h_prev, memory_prev), w_hh, b_hh, uniform
    )
    # The memory is the GRU update of the full-precision memory, with gates computed from h.
    x_r, x_z, x_n = projected.chunk(3, dim=1)
    h_r, h_z, h_n = (h_prev @ w_hh.T + b_hh).chunk(3, dim=1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    expected = (1 - z) * torch.tanh(x_n + r * h_n) + z * memory_prev
    assert (memory - expected).abs().max() < 1e-6
    assert not set(memory.unique().tolist()) <= {-1.0, 0.0, 1.0}
    # h is BTQ of the memory, with slot 3's draws: sign(a) where u < |a|.
    assert torch.equal(h, torch.sign(expected) * (uniform[3] < expected.abs()))
    assert h is h_again

    # Without hidden quantization it is the plain GRU step: h is the memory.
    plain, _ = gru_step(_hidden_only_cell(""), projected, memory_prev, w_hh, b_hh, uniform)
    h, (_, memory) = gru_accumulator_step(
        _hidden_only_cell(""), projected, (memory_prev, memory_prev), w_hh, b_hh, uniform
    )
    assert torch.equal(h, plain) and torch.equal(memory, plain)
