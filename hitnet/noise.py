"""The random draws of a training forward pass (dropout masks, BTQ's uniforms), one run's or
several stacked runs' at once.

A single run draws from one ``torch.Generator`` (or, given none, torch's global RNG, as
``F.dropout`` does). Stacked runs (``hitnet.stacked_model``) draw each run's noise from that
run's own generator, in the same shapes and order as the single run does, and stack the draws:
R runs given seeds s_1..s_R then see exactly the noise of R single runs given those seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Generators = Sequence[torch.Generator | None]


def uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) draws of ``shape`` on ``like``'s device and dtype."""
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def keep_mask(
    shape: tuple[int, ...], p: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Dropout's scaled mask: 1 / (1 - p) with probability 1 - p, else 0."""
    mask = torch.empty(shape, device=like.device, dtype=like.dtype)
    return mask.bernoulli_(1 - p, generator=generator) / (1 - p)


def dropout(x: Tensor, p: float, training: bool, generator: torch.Generator | None) -> Tensor:
    """``F.dropout``; given a generator, its mask is drawn from it."""
    if generator is None:
        return F.dropout(x, p, training)
    if not training or p == 0:
        return x
    return x * keep_mask(tuple(x.shape), p, x, generator)


def per_run(draw: Callable[[torch.Generator | None], Tensor], generators: Generators, dim: int):
    """``draw(generator)`` once per run, stacked at ``dim``."""
    return torch.stack([draw(generator) for generator in generators], dim)


def per_run_dropout(
    x: Tensor, p: float, training: bool, generators: Generators, run_dim: int
) -> Tensor:
    """Dropout of stacked runs: run r's mask is what ``dropout`` draws from its generator."""
    if not training or p == 0:
        return x
    shape = x.shape[:run_dim] + x.shape[run_dim + 1 :]
    return x * per_run(lambda generator: keep_mask(shape, p, x, generator), generators, run_dim)
