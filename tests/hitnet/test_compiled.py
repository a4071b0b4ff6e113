"""The compiled recurrence (the GPU fast path) computes the reference recurrence's function."""

from dataclasses import replace

import pytest
import torch

from hitnet.quantizers import QuantConfig, set_activation_noise
from hitnet.recurrent import SlopedGRU, SlopedLSTM, run_layer
from tests.hitnet.compiled_checks import assert_compiled_equals_reference

TERNARY = QuantConfig(weight="ttq", activation="btq")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cls", "quant"),
    [
        (SlopedLSTM, TERNARY),
        (SlopedGRU, TERNARY),
        (SlopedGRU, replace(TERNARY, gru_accumulator=True)),
    ],
)
def test_compiled_path_equals_reference_outputs_states_and_gradients(cls, quant):
    torch.manual_seed(0)
    reference = cls(6, 12, num_layers=2, quant=quant, lambda_sigma=2.0, lambda_tanh=1.5)
    compiled = cls(6, 12, num_layers=2, quant=quant, lambda_sigma=2.0, lambda_tanh=1.5)
    compiled.load_state_dict(reference.state_dict())
    compiled.compile_recurrence("default")  # inductor; on a GPU the pipeline adds CUDA graphs

    def forward(layer, x, seed):
        return layer(x, generator=torch.Generator().manual_seed(seed))

    # Same seed, same Bernoulli draws: the same ternarization, so equal outputs.
    x = torch.randn(5, 3, 6)
    assert_compiled_equals_reference(reference, compiled, x, forward, exact_outputs=True)


@pytest.mark.slow
def test_compiled_path_reads_each_new_noise_level_without_recompiling():
    torch.manual_seed(0)
    reference = SlopedGRU(6, 12, quant=TERNARY)
    compiled = SlopedGRU(6, 12, quant=TERNARY)
    compiled.load_state_dict(reference.state_dict())
    compiled.compile_recurrence("default")
    x = torch.randn(5, 3, 6)
    outputs = []
    for call, level in enumerate((0.3, 0.8)):
        for layer in (reference, compiled):
            set_activation_noise(layer, level)  # in place, as the training loop does
        # The first call compiles; the second must find the new level in the buffer, not a
        # constant baked into the graph.
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            out = compiled(x, generator=torch.Generator().manual_seed(1))[0]
        expected = reference(x, generator=torch.Generator().manual_seed(1))[0]
        assert (out - expected).abs().max() < 1e-5
        outputs.append(out)
    assert (outputs[0] - outputs[1]).abs().max() > 0.1


@pytest.mark.slow
def test_models_differing_only_in_slopes_and_threshold_share_one_compiled_graph():
    """A sweep's trials: their slopes and TTQ threshold are the graph's inputs, not constants
    baked into it, so the second model reuses the first one's graph (and torch.compile's
    cache across processes) and still computes with its own values."""
    outputs = []
    for call, (slope, threshold) in enumerate(((2.0, 0.5), (1.5, 0.9))):
        torch.manual_seed(0)
        quant = replace(TERNARY, ttq_threshold=threshold)
        reference = SlopedLSTM(6, 12, quant=quant, lambda_sigma=slope, lambda_tanh=slope)
        compiled = SlopedLSTM(6, 12, quant=quant, lambda_sigma=slope, lambda_tanh=slope)
        compiled.load_state_dict(reference.state_dict())
        compiled.compile_recurrence("default")
        x = torch.randn(5, 3, 6)
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            out = compiled(x, generator=torch.Generator().manual_seed(1))[0]
        expected = reference(x, generator=torch.Generator().manual_seed(1))[0]
        assert torch.equal(out, expected)
        outputs.append(out)
    assert (outputs[0] - outputs[1]).abs().max() > 0.1


def test_compile_recurrence_none_restores_the_eager_path():
    layer = SlopedLSTM(4, 8, quant=TERNARY)
    layer.compile_recurrence("default")
    layer.compile_recurrence(None)
    assert layer.compile_mode is None and layer._run_layer is run_layer
    x = torch.randn(3, 2, 4)
    a = layer(x, generator=torch.Generator().manual_seed(3))[0]
    b = layer(x, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)
