"""Quantizers of HitNet (see ../shared/HITNET.md), each with a straight-through gradient.

Three layers, each testable alone:
  * ``straight_through(x, q)``: value of ``q``, gradient of the identity w.r.t. ``x``;
  * plain functions ``ternarize_threshold`` (TTQ), ``ternarize_bernoulli`` (BTQ) and
    ``quantize_uniform`` (UQ) that compute the quantized value;
  * ``WeightQuantizer`` / ``ActivationQuantizer`` modules that the recurrent layers call, so
    forward hooks can observe exactly what the layer computed with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import torch
from annotated_types import Interval
from torch import Tensor, nn

from hitnet.constraints import check_fields

QuantizerName = Literal["none", "ttq", "btq", "uq"]
BTQEvalMode = Literal["stochastic", "deterministic"]
SlopeGradient = Literal["sloped", "unit"]
ActivationGroup = Literal["gates", "candidate", "hidden"]
ACTIVATION_GROUPS: frozenset[ActivationGroup] = frozenset(get_args(ActivationGroup))


class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantized value exactly; backward passes the gradient to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, quantized: Tensor) -> Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def straight_through(x: Tensor, quantized: Tensor) -> Tensor:
    """``quantized`` in the forward pass, d/dx = identity in the backward pass (STE)."""
    return _StraightThrough.apply(x, quantized.detach())


def ternarize_threshold(
    w: Tensor,
    threshold: float | Tensor = 0.7,
    scaled: bool = True,
    per_row: bool = False,
    run_dims: int = 0,
) -> Tensor:
    """TTQ: delta = threshold * mean|w|; keep sign(w) where |w| > delta, else 0.

    The kept entries are scaled by alpha = mean |w| over them (TWN), or by 1 when
    ``scaled`` is False, giving pure {-1, 0, 1}. ``per_row``: delta and alpha per row (one
    output unit of a weight matrix) instead of one pair for the whole tensor. ``run_dims``:
    that many leading dimensions index stacked runs' tensors, each ternarized on its own.
    Gradient: straight through to ``w``.
    """
    magnitude = w.detach().abs()
    over: dict = {}  # the reductions' extent: the whole tensor
    if per_row:
        over = {"dim": -1, "keepdim": True}
    elif run_dims:
        over = {"dim": tuple(range(run_dims, w.dim())), "keepdim": True}
    delta = threshold * magnitude.mean(**over)
    keep = magnitude > delta
    ternary = torch.sign(w.detach()) * keep
    if scaled:
        kept = keep.sum(**over).clamp_min(1)
        alpha = (magnitude * keep).sum(**over) / kept
        ternary = ternary * alpha
    return straight_through(w, ternary.to(w.dtype))


def ternarize_bernoulli(
    x: Tensor,
    uniform: Tensor | None = None,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
) -> Tensor:
    """BTQ: q = sign(x) * Bernoulli(|x|) for x in [-1, 1], so E[q] = x.

    For x in [0, 1] (a sigmoid output) this is Bernoulli(x) in {0, 1}. ``uniform`` supplies
    the U[0, 1) draws (so a caller can draw all of them at once); otherwise they are drawn
    from ``generator``. ``deterministic`` rounds to the nearest of {-1, 0, 1} instead.
    Gradient: straight through to ``x``.
    """
    magnitude = x.detach().abs()
    if deterministic:
        fire = magnitude > 0.5
    else:
        if uniform is None:
            uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        fire = uniform < magnitude
    return straight_through(x, torch.sign(x.detach()) * fire)


def quantize_uniform(x: Tensor, bits: int = 2) -> Tensor:
    """UQ: clip to [-1, 1], round to the nearest of 2**bits evenly spaced levels.

    Gradient: straight through inside [-1, 1], zero outside (the clip's own gradient).
    """
    if bits < 1:
        raise ValueError(f"quantize_uniform needs bits >= 1, got {bits}")
    clipped = x.clamp(-1.0, 1.0)
    steps = 2**bits - 1
    levels = torch.round((clipped.detach() + 1.0) * (steps / 2.0))
    return straight_through(clipped, levels * (2.0 / steps) - 1.0)


@dataclass(frozen=True)
class QuantConfig:
    """Which quantizer a recurrent layer applies to its weights and to which activations.

    ``activations`` names the groups quantized by ``activation``: ``gates`` (sigmoid
    outputs), ``candidate`` (the tanh candidate) and ``hidden`` (h_t). The LSTM cell state
    always stays full precision. ``gru_accumulator``: the GRU keeps a separate memory too
    (see ``hitnet.recurrent.gru_accumulator_step``); its ternary h_t still feeds the
    recurrent matmul and the decoder. With gates and candidate ternary that memory is itself
    ternary, so only configurations that leave one of them full precision see a difference.
    ``slope_gradient``: ``unit`` backpropagates through sloped activations as if the slopes
    were 1 (see ``hitnet.recurrent.sloped``). ``weight="btq"`` exists for the quantizer study
    (see ``WeightQuantizer``); HitNet's weights take TTQ.
    """

    weight: QuantizerName = "none"
    activation: QuantizerName = "none"
    activations: frozenset[ActivationGroup] = ACTIVATION_GROUPS
    # delta = ttq_threshold * mean|w|; past 3, few weights of a trained matrix survive
    ttq_threshold: Annotated[float, Interval(ge=0, le=3)] = 0.7
    ttq_scaled: bool = True
    ttq_per_row: bool = False  # a threshold and scale per output row, not per matrix
    uq_bits: Annotated[int, Interval(ge=1, le=8)] = 2
    btq_eval: BTQEvalMode = "stochastic"
    gru_accumulator: bool = False
    slope_gradient: SlopeGradient = "sloped"

    def __post_init__(self) -> None:
        object.__setattr__(self, "activations", frozenset(self.activations))
        check_fields(self)

    @property
    def full_precision(self) -> bool:
        return self.weight == "none" and (self.activation == "none" or not self.activations)

    def quantizes(self, group: str) -> bool:
        return self.activation != "none" and group in self.activations

    @property
    def needs_noise(self) -> bool:
        """True when a training forward pass draws Bernoulli noise."""
        return self.activation == "btq" and bool(self.activations)


# HitNet's quantization (../shared/HITNET.md): TTQ weights, BTQ activations; params.yaml's
# defaults. QuantConfig's own defaults quantize nothing: a full-precision model.
HITNET_QUANT = QuantConfig(weight="ttq", activation="btq")


class WeightQuantizer(nn.Module):
    """Quantizes a full-precision shadow weight matrix (identity when ``kind`` is none).

    BTQ on weights, as UQ, works on the weights clipped to [-1, 1], unscaled; its draws come
    from torch's global RNG, one per forward pass, in evaluation too (rounded, every weight
    under 0.5 in magnitude would be 0). ``run_dims``: leading dimensions that index stacked
    runs' matrices (``hitnet.stacked_recurrent``), each quantized on its own.

    TTQ's threshold lives in a buffer: a compiled recurrence takes it as an input, not a
    constant, so models that differ only in it (a sweep's trials) share one compiled graph
    and torch.compile's cache.
    """

    def __init__(
        self, config: QuantConfig, run_dims: int = 0, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.run_dims = run_dims
        threshold = torch.tensor(config.ttq_threshold, device=device)
        self.register_buffer("ttq_threshold", threshold, persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        config = self.config
        if config.weight == "ttq":
            return ternarize_threshold(
                weight, self.ttq_threshold, config.ttq_scaled, config.ttq_per_row, self.run_dims
            )
        if config.weight == "uq":
            return quantize_uniform(weight, config.uq_bits)
        if config.weight == "btq":
            return ternarize_bernoulli(weight.clamp(-1.0, 1.0))
        return weight


class ActivationQuantizer(nn.Module):
    """Quantizes one activation group; identity when that group is not configured.

    Activations are unscaled: TTQ here gives pure {-1, 0, 1}. BTQ draws from ``uniform``
    while training and, in eval mode, too unless ``btq_eval`` is deterministic.

    A warm-up (``set_noise_level``) lets training pass ``x + p * (Q(x) - x)``: only a
    fraction ``p`` of the quantization noise, so a model can move from full precision to
    ternary by degrees. ``p`` lives in a buffer filled in place, so a compiled recurrence
    (CUDA graphs included) reads each new value without recompiling. Evaluation is always
    fully quantized. ``run_dims``: leading dimensions that index stacked runs, whose
    activations TTQ thresholds each on their own.
    """

    def __init__(self, config: QuantConfig, group: str, run_dims: int = 0) -> None:
        super().__init__()
        self.config = config
        self.group = group
        self.run_dims = run_dims
        self.enabled = config.quantizes(group)
        self.warming_up = False  # True once set_noise_level was called
        # Not persistent: a schedule of training, not part of the model (FP checkpoints load).
        self.register_buffer("noise_level", torch.ones(()), persistent=False)

    def set_noise_level(self, level: float) -> None:
        """Training passes ``x + level * (Q(x) - x)`` from now on; level 1 is plain ``Q(x)``."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"noise level must be in [0, 1], got {level}")
        self.noise_level.fill_(level)
        self.warming_up = True

    def forward(self, x: Tensor, uniform: Tensor | None = None) -> Tensor:
        if not self.enabled:
            return x
        quantized = self._quantize(x, uniform)
        if self.training and self.warming_up:
            # d/dx is still 1: (1 - p) through x, p straight through Q.
            return torch.lerp(x, quantized, self.noise_level)
        return quantized

    def _quantize(self, x: Tensor, uniform: Tensor | None) -> Tensor:
        kind = self.config.activation
        if kind == "btq":
            deterministic = not self.training and self.config.btq_eval == "deterministic"
            return ternarize_bernoulli(x, uniform=uniform, deterministic=deterministic)
        if kind == "ttq":
            return ternarize_threshold(
                x, self.config.ttq_threshold, scaled=False, run_dims=self.run_dims
            )
        return quantize_uniform(x, self.config.uq_bits)

    def extra_repr(self) -> str:
        return f"group={self.group}, kind={self.config.activation if self.enabled else 'none'}"


def set_activation_noise(model: nn.Module, level: float) -> None:
    """``ActivationQuantizer.set_noise_level(level)`` on every activation quantizer of ``model``."""
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            module.set_noise_level(level)
