"""Polyak averaging: the running mean of a model's weights over its optimizer steps.

Averaged SGD evaluates the mean of the iterates instead of the last one; on PTB it is what
lets a noisy SGD trajectory settle (AWD-LSTM's NT-ASGD). For a ternary model the mean is of
the full-precision shadow weights, which are then ternarized as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightAverage:
    """Mean of ``module``'s parameters over every ``update()`` since construction."""

    def __init__(self, module: nn.Module, count: int = 1, mean: dict[str, Tensor] | None = None):
        self.module = module
        self.count = count
        self.mean = mean or {name: p.detach().clone() for name, p in module.named_parameters()}
        if self.mean.keys() != dict(module.named_parameters()).keys():
            raise ValueError("a weight average must hold exactly the module's parameters")
        self.applied = False  # True between two swaps: the module holds the mean

    def state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Copies of (the mean, the weights training goes on from), whether or not applied."""
        current = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        held = {name: t.clone() for name, t in self.mean.items()}
        return (current, held) if self.applied else (held, current)

    @torch.no_grad()
    def update(self) -> None:
        """Folds the module's current weights into the mean."""
        self.count += 1
        for name, p in self.module.named_parameters():
            self.mean[name].lerp_(p, 1.0 / self.count)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the module's weights with the mean; a second call undoes the first."""
        for name, p in self.module.named_parameters():
            held = p.detach().clone()
            p.copy_(self.mean[name])
            self.mean[name] = held
        self.applied = not self.applied
