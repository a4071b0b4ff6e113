"""What the quantizer study measures (HitNet's analysis, ../shared/HITNET.md): the squared
error of each quantizer on a tensor, how polarized activations are, and the distributions of
the activations a recurrent layer computes, seen by forward hooks on its quantizers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from hitnet.language_model import RNNLanguageModel
from hitnet.quantizers import ACTIVATION_GROUPS, ActivationQuantizer, QuantConfig, WeightQuantizer

StudiedQuantizer = Literal["uq", "ttq", "btq"]
STUDIED_QUANTIZERS: tuple[StudiedQuantizer, ...] = ("uq", "ttq", "btq")
# Where each group's values lie: sigmoid outputs, tanh outputs, o * tanh(c) or a GRU's h.
GROUP_RANGES = {"gates": (0.0, 1.0), "candidate": (-1.0, 1.0), "hidden": (-1.0, 1.0)}
# The recurrent layer's quantizer module of each activation group.
QUANTIZER_OF = {
    "gates": "gate_quantizer",
    "candidate": "candidate_quantizer",
    "hidden": "hidden_quantizer",
}


def expected_btq_squared_error(x: Tensor) -> Tensor:
    """E[(BTQ(x) - x)^2], elementwise and exact: BTQ draws sign(c) with probability |c| for
    c = x clipped to [-1, 1], so the error is |c| (1 - |c|) + (x - c)^2. An expectation over
    the draws, so the study's error figures carry no sampling noise."""
    clipped = x.clamp(-1.0, 1.0)
    magnitude = clipped.abs()
    return magnitude * (1 - magnitude) + (x - clipped).square()


def squared_error(x: Tensor, kind: StudiedQuantizer, config: QuantConfig, weights: bool) -> Tensor:
    """(Q(x) - x)^2 elementwise, Q as the recurrent layer applies ``kind`` to weights (through
    ``WeightQuantizer``) or to activations (``ActivationQuantizer``), with ``config``'s
    threshold and bits; BTQ's is its expectation over the draws."""
    if kind == "btq":
        return expected_btq_squared_error(x)
    if weights:
        quantized = WeightQuantizer(replace(config, weight=kind))(x)
    else:
        studied = replace(config, activation=kind, activations=ACTIVATION_GROUPS)
        quantizer = ActivationQuantizer(studied, "hidden")
        quantized = quantizer(x)
    return (quantized - x).square()


def quantizer_levels(
    x: Tensor, kind: StudiedQuantizer, config: QuantConfig, weights: bool
) -> list[float]:
    """The values ``kind`` maps ``x`` to: UQ's 2**bits grid on [-1, 1]; -1, 0, 1 for BTQ and
    for TTQ of activations; -alpha, 0, alpha for TTQ of weights (alpha from ``x``)."""
    if kind == "uq":
        return torch.linspace(-1.0, 1.0, 2**config.uq_bits).tolist()
    if kind == "ttq" and weights:
        return torch.unique(WeightQuantizer(replace(config, weight="ttq"))(x)).tolist()
    return [-1.0, 0.0, 1.0]


def near_a_ternary_level(x: Tensor, within: float) -> Tensor:
    """True where ``x`` lies within ``within`` of -1, 0 or 1: a polarized activation, which
    ternarizing barely changes."""
    return (x - x.round().clamp(-1.0, 1.0)).abs() <= within


def histogram(x: Tensor, bins: int, low: float, high: float) -> Tensor:
    """Counts of ``x`` in ``bins`` equal bins over [low, high] (both ends included)."""
    return torch.histc(x.detach().float().flatten(), bins=bins, min=low, max=high).cpu()


@dataclass
class ActivationStatistics:
    """One activation group over the recorded windows: its histogram over ``GROUP_RANGES``,
    the squared error of each studied quantizer, and how many values lie near a level."""

    histogram: Tensor
    count: int = 0
    polarized: int = 0
    error_sums: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(STUDIED_QUANTIZERS, 0.0)
    )

    def mse(self, kind: StudiedQuantizer) -> float:
        return self.error_sums[kind] / max(self.count, 1)

    @property
    def polarized_fraction(self) -> float:
        return self.polarized / max(self.count, 1)


def pooled(statistics: dict[str, ActivationStatistics]) -> ActivationStatistics:
    """The groups' statistics as one population (histograms of different ranges dropped)."""
    total = ActivationStatistics(histogram=torch.zeros(0))
    for group in statistics.values():
        total.count += group.count
        total.polarized += group.polarized
        for kind in STUDIED_QUANTIZERS:
            total.error_sums[kind] += group.error_sums[kind]
    return total


class ActivationRecorder:
    """Forward hooks on a model's activation quantizers, which see each activation before it
    is quantized: the FP model's as much as a ternary one's. While recording, the recurrent
    layer runs its reference recurrence eagerly (torch's fused kernel and compiled code
    would call no hooks); it goes back to its own path afterwards."""

    def __init__(
        self, model: RNNLanguageModel, config: QuantConfig, bins: int, polarized_within: float
    ) -> None:
        self.recurrent = model.recurrent
        self.config = config
        self.bins = bins
        self.within = polarized_within
        self.statistics = {
            group: ActivationStatistics(histogram=torch.zeros(bins)) for group in GROUP_RANGES
        }
        self._hooks: list = []

    def _observe(self, group: str, x: Tensor) -> None:
        x = x.detach()
        stats = self.statistics[group]
        stats.histogram += histogram(x, self.bins, *GROUP_RANGES[group])
        stats.count += x.numel()
        stats.polarized += int(near_a_ternary_level(x, self.within).sum())
        for kind in STUDIED_QUANTIZERS:
            stats.error_sums[kind] += float(squared_error(x, kind, self.config, False).sum())

    def __enter__(self) -> ActivationRecorder:
        layer = self.recurrent
        # The compiled function itself is kept: a new one would compile again on a GPU.
        self._restore = (layer.fused_full_precision, layer.compile_mode, layer._run_layer)
        layer.fused_full_precision = False
        layer.compile_recurrence(None)
        for group, name in QUANTIZER_OF.items():
            quantizer = getattr(layer, name)
            self._hooks.append(
                quantizer.register_forward_hook(
                    lambda _module, args, _output, group=group: self._observe(group, args[0])
                )
            )
        return self

    def __exit__(self, *_: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        layer = self.recurrent
        layer.fused_full_precision, layer.compile_mode, layer._run_layer = self._restore


def record_activations(
    model: RNNLanguageModel,
    windows: Iterable[tuple[Tensor, Tensor]],
    bins: int,
    polarized_within: float,
    config: QuantConfig,
    seed: int = 0,
) -> dict[str, ActivationStatistics]:
    """Runs ``model`` in evaluation over ``windows`` (consecutive bptt windows, the state
    carried as in validation) and returns each activation group's statistics. ``config``
    gives the studied quantizers' threshold and bits; ``seed`` the draws of a model whose
    BTQ draws at evaluation."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with ActivationRecorder(model, config, bins, polarized_within) as recorder, torch.no_grad():
        state = None
        for inputs, _targets in windows:
            inputs = inputs.to(device)
            if state is None:
                state = model.initial_state(inputs.size(1), device)
            _, state = model(inputs, state, generator=generator)
    model.train(was_training)
    return recorder.statistics
