"""The check that a compiled recurrence (the GPU fast path) computes its eager reference's
function, shared by the single-run (test_compiled.py) and stacked-run (test_multirun.py) tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (layer, input, seed) -> (output, state): the layer's forward with its noise drawn from seed
Forward = Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, object]]


def flat_state(state: object) -> torch.Tensor:
    """A layer's state, (h, c) or h, as one flat tensor."""
    parts = state if isinstance(state, tuple) else (state,)
    return torch.cat([part.flatten() for part in parts])


def assert_compiled_equals_reference(
    reference: nn.Module,
    compiled: nn.Module,
    x: torch.Tensor,
    forward: Forward,
    exact_outputs: bool,
) -> None:
    """Two calls with the same seeds on both layers (the second reuses the compiled graph):
    outputs (equal to the bit when ``exact_outputs``), states and the input's and every
    parameter's gradients within 1e-5."""
    for seed in (0, 1):
        x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref, state_ref = forward(reference, x_ref, seed)
        out_fast, state_fast = forward(compiled, x_fast, seed)
        if exact_outputs:
            assert torch.equal(out_ref, out_fast)
        else:
            assert (out_ref - out_fast).abs().max() < 1e-5
        assert (flat_state(state_ref) - flat_state(state_fast)).abs().max() < 1e-5
        upstream = torch.randn_like(out_ref)
        (out_ref * upstream).sum().backward()
        (out_fast * upstream).sum().backward()
        assert (x_ref.grad - x_fast.grad).abs().max() < 1e-5
        for (name, p_ref), p_fast in zip(
            reference.named_parameters(), compiled.parameters(), strict=True
        ):
            assert (p_ref.grad - p_fast.grad).abs().max() < 1e-5, name
        reference.zero_grad()
        compiled.zero_grad()
