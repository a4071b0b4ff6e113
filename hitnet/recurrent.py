"""Sloped, optionally ternary LSTM and GRU layers (HitNet, see ../shared/HITNET.md).

``SlopedLSTM`` / ``SlopedGRU`` subclass ``torch.nn.LSTM`` / ``torch.nn.GRU``: same
parameters under the same names (``weight_ih_l0``, ...), same gate order (LSTM i, f, g, o;
GRU r, z, n), so a full-precision checkpoint loads into a ternary layer unchanged.

With quantization off and both slopes 1 the math is torch's own, so by default the layer
hands the work to torch's fused kernel (cuDNN on a GPU). Otherwise it runs the reference
recurrence below, one time step at a time:

    LSTM: i, f, o = Q_g(sigmoid(ls * .)), g = Q_c(tanh(lt * .)),
          c_t = f * c_{t-1} + i * g (full precision), h_t = Q_h(o * tanh(lt * c_t))
    GRU:  r, z = Q_g(sigmoid(ls * .)), n = Q_c(tanh(lt * (W_in x + b_in + r * (W_hn h + b_hn)))),
          h_t = Q_h((1 - z) * n + z * h_{t-1})
    GRU with ``quant.gru_accumulator``: a_t = (1 - z) * n + z * a_{t-1} is the memory (as
          the LSTM's c_t) and h_t = Q_h(a_t) feeds W_hn / the decoder; with z and n
          ternary a_t is itself ternary, so this equals the plain GRU

with weights W = Q_w(W_shadow) quantized once per forward pass. ``compile_recurrence``
runs that same recurrence through ``torch.compile`` (the fast path on a GPU). The step
functions also take R stacked runs at once (weights with a leading run dimension, see
``linear``): ``hitnet.stacked_recurrent`` runs them so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hitnet.noise import dropout
from hitnet.noise import uniform as draw_uniform
from hitnet.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer, straight_through


class Cell(NamedTuple):
    """What one cell step needs besides tensors: the quantizers and the sloping factors."""

    weight: WeightQuantizer
    gates: ActivationQuantizer
    candidate: ActivationQuantizer
    hidden: ActivationQuantizer
    # the float 1.0 for no slope, else the slope as a tensor: a compiled recurrence takes it
    # as an input, so models that differ only in their slopes share one compiled graph
    lambda_sigma: float | Tensor
    lambda_tanh: float | Tensor
    unit_slope_gradient: bool = False  # QuantConfig.slope_gradient == "unit"


def sloped(
    fn: Callable[[Tensor], Tensor], x: Tensor, slope: float | Tensor, unit_gradient: bool
) -> Tensor:
    """``fn(slope * x)``; with ``unit_gradient`` its gradient is ``fn``'s at ``x``, as if the
    slope were 1: the slope then polarizes the forward pass only. (Through straight-through
    quantizers a slope of 2 multiplies the gradient at every step of the recurrence, and it
    explodes over a bptt window.)"""
    if not isinstance(slope, Tensor) and slope == 1.0:
        return fn(x)
    value = fn(slope * x)
    return straight_through(fn(x), value) if unit_gradient else value


def _slot(uniform: Tensor | None, index: int) -> Tensor | None:
    return None if uniform is None else uniform[index]


def linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear``; or, for stacked runs' weights (R, out, in) and biases (R, out), run r's
    applied to ``x[..., r, :, :]`` (x of shape (..., R, n, in)) as one batched matmul."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return torch.matmul(x, weight.mT) + bias.unsqueeze(-2)


def lstm_step(
    cell: Cell,
    projected: Tensor,
    state: tuple[Tensor, Tensor],
    w_hh: Tensor,
    b_hh: Tensor,
    uniform: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM step; ``uniform`` holds the draws for i, f, g, o, h. Returns (h, (h, c))."""
    h, c = state
    i, f, g, o = (projected + linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    ls, lt, unit = cell.lambda_sigma, cell.lambda_tanh, cell.unit_slope_gradient
    i = cell.gates(sloped(torch.sigmoid, i, ls, unit), _slot(uniform, 0))
    f = cell.gates(sloped(torch.sigmoid, f, ls, unit), _slot(uniform, 1))
    g = cell.candidate(sloped(torch.tanh, g, lt, unit), _slot(uniform, 2))
    o = cell.gates(sloped(torch.sigmoid, o, ls, unit), _slot(uniform, 3))
    c = f * c + i * g  # the cell state is an accumulator: it stays full precision
    h = cell.hidden(o * sloped(torch.tanh, c, lt, unit), _slot(uniform, 4))
    return h, (h, c)


def _gru_update(
    cell: Cell,
    projected: Tensor,
    h: Tensor,
    memory: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    uniform: Tensor | None,
) -> Tensor:
    """(1 - z) * n + z * memory, with gates and candidate computed from h."""
    x_r, x_z, x_n = projected.chunk(3, dim=-1)
    h_r, h_z, h_n = linear(h, w_hh, b_hh).chunk(3, dim=-1)
    ls, lt, unit = cell.lambda_sigma, cell.lambda_tanh, cell.unit_slope_gradient
    r = cell.gates(sloped(torch.sigmoid, x_r + h_r, ls, unit), _slot(uniform, 0))
    z = cell.gates(sloped(torch.sigmoid, x_z + h_z, ls, unit), _slot(uniform, 1))
    n = cell.candidate(sloped(torch.tanh, x_n + r * h_n, lt, unit), _slot(uniform, 2))
    return (1 - z) * n + z * memory


def gru_step(
    cell: Cell,
    projected: Tensor,
    h: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    uniform: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One GRU step; ``uniform`` holds the draws for r, z, n, h. Returns (h, h)."""
    h = cell.hidden(_gru_update(cell, projected, h, h, w_hh, b_hh, uniform), _slot(uniform, 3))
    return h, h


def gru_accumulator_step(
    cell: Cell,
    projected: Tensor,
    state: tuple[Tensor, Tensor],
    w_hh: Tensor,
    b_hh: Tensor,
    uniform: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A GRU step whose memory ``a`` is kept apart from ``h = Q_h(a)``, what the matmuls
    see, as the LSTM's cell state is. ``a`` holds more than {-1, 0, 1} only when gates or
    candidate stay full precision; otherwise this equals ``gru_step``. Returns (h, (h, a))."""
    h, a = state
    a = _gru_update(cell, projected, h, a, w_hh, b_hh, uniform)
    h = cell.hidden(a, _slot(uniform, 3))
    return h, (h, a)


Step = Callable[..., tuple[Tensor, object]]


def cell_step(cell: str, quant: QuantConfig) -> Step:
    """The step function of ``cell`` (lstm or gru) under ``quant``."""
    if cell == "lstm":
        return lstm_step
    return gru_accumulator_step if quant.gru_accumulator else gru_step


def run_layer(
    step: Step,
    cell: Cell,
    weights: tuple[Tensor, Tensor, Tensor, Tensor],
    layer_input: Tensor,
    state: object,
    uniform: Tensor | None,
) -> tuple[Tensor, object]:
    """One layer over the whole sequence; a free function so ``torch.compile`` can take it."""
    w_ih, w_hh, b_ih, b_hh = weights
    w_ih, w_hh = cell.weight(w_ih), cell.weight(w_hh)  # quantized once per forward pass
    # The input projection needs no recurrence: one matmul for the whole sequence.
    projected = linear(layer_input, w_ih, b_ih)
    outputs = []
    for t in range(layer_input.size(0)):
        output, state = step(cell, projected[t], state, w_hh, b_hh, _slot(uniform, t))
        outputs.append(output)
    return torch.stack(outputs), state


class _SlopedRecurrence:
    """What the sloped LSTM and GRU share: quantizers, slopes and the loop over layers (and
    what ``hitnet.stacked_recurrent`` shares with them)."""

    cell_type: str  # lstm or gru
    noise_slots: int  # uniform draws per unit and step: one per quantized activation
    run_dims = 0  # leading dimensions of stacked runs in weights and activations

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        quant: QuantConfig | None = None,
        lambda_sigma: float = 1.0,
        lambda_tanh: float = 1.0,
        fused_full_precision: bool = True,
    ) -> None:
        # super() is torch.nn.LSTM or torch.nn.GRU: the parameters are theirs.
        super().__init__(input_size, hidden_size, num_layers=num_layers, dropout=dropout)
        if not all(math.isfinite(slope) and slope > 0 for slope in (lambda_sigma, lambda_tanh)):
            raise ValueError(
                f"sloping factors must be finite and > 0, got lambda_sigma={lambda_sigma}, "
                f"lambda_tanh={lambda_tanh}"
            )
        self.quant = quant or QuantConfig()
        self.lambda_sigma = float(lambda_sigma)
        self.lambda_tanh = float(lambda_tanh)
        for name, slope in (("sigma_slope", lambda_sigma), ("tanh_slope", lambda_tanh)):
            self.register_buffer(name, torch.tensor(float(slope)), persistent=False)
        self.fused_full_precision = fused_full_precision
        self.compile_recurrence(None)

    @property
    def quant(self) -> QuantConfig:
        return self._quant

    @quant.setter
    def quant(self, config: QuantConfig) -> None:
        """A new config takes effect at once: the quantizers are rebuilt from it."""
        self._quant = config
        weight = next(self.parameters(), None)  # where the model is: the buffers go there too
        device = None if weight is None else weight.device
        self.weight_quantizer = WeightQuantizer(config, self.run_dims, device)
        self.gate_quantizer = ActivationQuantizer(config, "gates", self.run_dims)
        self.candidate_quantizer = ActivationQuantizer(config, "candidate", self.run_dims)
        self.hidden_quantizer = ActivationQuantizer(config, "hidden", self.run_dims)

    @property
    def step(self) -> Step:
        return cell_step(self.cell_type, self.quant)

    @property
    def paired_state(self) -> bool:
        """True when the state is a pair, (h, c) or (h, a), rather than h alone."""
        return self.cell_type == "lstm" or self.quant.gru_accumulator

    def compile_recurrence(self, mode: str | None = "reduce-overhead") -> None:
        """Runs each layer's recurrence through ``torch.compile`` (None: back to eager).

        The compiled function is the reference recurrence itself, unrolled over time: the
        per-step elementwise work fuses into a few kernels and, with ``reduce-overhead``,
        the sequence replays as CUDA graphs. The Bernoulli draws happen outside it, so both
        paths ternarize identically for the same seed.
        """
        self.compile_mode = mode
        self._run_layer = (
            run_layer
            if mode is None
            else torch.compile(run_layer, mode=mode, dynamic=False, fullgraph=True)
        )

    @property
    def uses_fused_kernel(self) -> bool:
        """True when torch's own kernel computes exactly this layer's function."""
        return (
            self.fused_full_precision
            and self.quant.full_precision
            and not self.quant.gru_accumulator  # a paired state is not torch's
            and self.lambda_sigma == 1.0
            and self.lambda_tanh == 1.0
        )

    def _check_input(self, input: Tensor) -> None:
        if self.batch_first:  # the reference recurrence is sequence-first only
            raise ValueError(f"{type(self).__name__} is sequence-first: batch_first must be False")
        if input.dim() != 3 or input.size(-1) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (seq_len, batch, "
                f"{self.input_size}), got {tuple(input.shape)}"
            )

    def _check_state(self, state: Tensor, input: Tensor, name: str) -> None:
        """As torch checks it: one (batch, hidden) slice per layer, no broadcasting."""
        expected = (self.num_layers, input.size(1), self.hidden_size)
        if tuple(state.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: expected {name} of shape {expected}, "
                f"got {tuple(state.shape)}"
            )

    def _cell(self) -> Cell:
        return Cell(
            self.weight_quantizer,
            self.gate_quantizer,
            self.candidate_quantizer,
            self.hidden_quantizer,
            1.0 if self.lambda_sigma == 1.0 else self.sigma_slope,
            1.0 if self.lambda_tanh == 1.0 else self.tanh_slope,
            self.quant.slope_gradient == "unit",
        )

    @property
    def draws_noise(self) -> bool:
        """True when a forward pass in the current mode draws BTQ noise."""
        btq_eval_deterministic = not self.training and self.quant.btq_eval == "deterministic"
        return self.quant.needs_noise and not btq_eval_deterministic

    def _draw_uniform(self, input: Tensor, generator: torch.Generator | None) -> Tensor | None:
        """All U[0,1) draws of one layer's forward pass at once, shaped (T, slot, B, H)."""
        if not self.draws_noise:
            return None
        seq_len, batch = input.shape[:2]
        return draw_uniform((seq_len, self.noise_slots, batch, self.hidden_size), input, generator)

    def _dropout(self, layer_input: Tensor, generator: torch.Generator | None) -> Tensor:
        """Dropout between layers, its mask drawn from ``generator`` when one is given."""
        return dropout(layer_input, self.dropout, self.training, generator)

    def _per_layer(self, hx: Tensor | tuple[Tensor, Tensor]) -> list[object]:
        """The initial state as one entry per layer."""
        if self.paired_state:
            return [(hx[0][layer], hx[1][layer]) for layer in range(self.num_layers)]
        return list(hx.unbind(0))

    def _joined(self, final: list[object]) -> Tensor | tuple[Tensor, Tensor]:
        """The final states of all layers, stacked as the initial state came."""
        if self.paired_state:
            return torch.stack([h for h, _ in final]), torch.stack([c for _, c in final])
        return torch.stack(final)

    def _run_layers(
        self, input: Tensor, initial_states: list[object], generator: object
    ) -> tuple[Tensor, list[object]]:
        """Runs every layer in turn, with dropout between layers as torch does."""
        if self.compile_mode == "reduce-overhead":
            # A new step: CUDA graph outputs of the last one may be overwritten from now on.
            torch.compiler.cudagraph_mark_step_begin()
        cell = self._cell()
        layer_input = input
        final_states = []
        for layer, state in enumerate(initial_states):
            weights = tuple(
                getattr(self, f"{name}_l{layer}")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            uniform = self._draw_uniform(layer_input, generator)
            layer_input, state = self._run_layer(
                self.step, cell, weights, layer_input, state, uniform
            )
            final_states.append(state)
            if layer < self.num_layers - 1 and self.dropout > 0:
                layer_input = self._dropout(layer_input, generator)
        return layer_input, final_states


class SlopedLSTM(_SlopedRecurrence, nn.LSTM):
    """``torch.nn.LSTM`` (sequence-first) with sloping factors and HitNet quantization."""

    cell_type = "lstm"
    noise_slots = 5  # i, f, g, o, h

    def forward(  # type: ignore[override]
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        self._check_input(input)
        if hx is None:
            zeros = input.new_zeros(self.num_layers, input.size(1), self.hidden_size)
            hx = (zeros, zeros)
        for state, name in zip(hx, ("h_0", "c_0"), strict=True):
            self._check_state(state, input, name)
        if self.uses_fused_kernel:
            return nn.LSTM.forward(self, input, hx)
        output, final = self._run_layers(input, self._per_layer(hx), generator)
        return output, self._joined(final)


class SlopedGRU(_SlopedRecurrence, nn.GRU):
    """``torch.nn.GRU`` (sequence-first) with sloping factors and HitNet quantization.

    With ``quant.gru_accumulator`` the state is a pair (h, a), shaped as the LSTM's (h, c).
    """

    cell_type = "gru"
    noise_slots = 4  # r, z, n, h

    def forward(  # type: ignore[override]
        self,
        input: Tensor,
        hx: Tensor | tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        self._check_input(input)
        if hx is None:
            hx = input.new_zeros(self.num_layers, input.size(1), self.hidden_size)
            if self.quant.gru_accumulator:
                hx = (hx, hx)
        for state, name in zip(
            hx if self.quant.gru_accumulator else (hx,), ("h_0", "a_0"), strict=False
        ):
            self._check_state(state, input, name)
        if self.uses_fused_kernel:
            return nn.GRU.forward(self, input, hx)
        output, final = self._run_layers(input, self._per_layer(hx), generator)
        return output, self._joined(final)


RECURRENT_LAYERS: dict[str, type[SlopedLSTM] | type[SlopedGRU]] = {
    "lstm": SlopedLSTM,
    "gru": SlopedGRU,
}
