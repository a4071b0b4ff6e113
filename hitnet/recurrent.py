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

with weights W = Q_w(W_shadow) quantized once per forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hitnet.quantizers import ActivationQuantizer, QuantConfig, WeightQuantizer

# One cell step: (projected input x_t, state, quantized W_hh, b_hh, uniform draws) -> state.
CellStep = Callable[[Tensor, object, Tensor, Tensor, Tensor | None], object]


class _SlopedRecurrence:
    """What the sloped LSTM and GRU share: quantizers, slopes and the loop over layers."""

    # Uniform draws per unit and step: one slot per quantized activation of a cell.
    noise_slots: int

    def _init_hitnet(
        self,
        quant: QuantConfig,
        lambda_sigma: float,
        lambda_tanh: float,
        fused_full_precision: bool,
    ) -> None:
        if lambda_sigma <= 0 or lambda_tanh <= 0:
            raise ValueError(
                f"sloping factors must be > 0, got lambda_sigma={lambda_sigma}, "
                f"lambda_tanh={lambda_tanh}"
            )
        self.quant = quant
        self.lambda_sigma = float(lambda_sigma)
        self.lambda_tanh = float(lambda_tanh)
        self.fused_full_precision = fused_full_precision
        self.weight_quantizer = WeightQuantizer(quant)
        self.gate_quantizer = ActivationQuantizer(quant, "gates")
        self.candidate_quantizer = ActivationQuantizer(quant, "candidate")
        self.hidden_quantizer = ActivationQuantizer(quant, "hidden")

    @property
    def uses_fused_kernel(self) -> bool:
        """True when torch's own kernel computes exactly this layer's function."""
        return (
            self.fused_full_precision
            and self.quant.full_precision
            and self.lambda_sigma == 1.0
            and self.lambda_tanh == 1.0
        )

    def _check_input(self, input: Tensor) -> None:
        if input.dim() != 3 or input.size(-1) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (seq_len, batch, "
                f"{self.input_size}), got {tuple(input.shape)}"
            )

    def _quantized_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            self.weight_quantizer(getattr(self, f"weight_ih_l{layer}")),
            self.weight_quantizer(getattr(self, f"weight_hh_l{layer}")),
            getattr(self, f"bias_ih_l{layer}"),
            getattr(self, f"bias_hh_l{layer}"),
        )

    def _draw_uniform(self, input: Tensor, generator: torch.Generator | None) -> Tensor | None:
        """All U[0,1) draws of one layer's forward pass at once, shaped (T, slot, B, H)."""
        btq_eval_deterministic = not self.training and self.quant.btq_eval == "deterministic"
        if not self.quant.needs_noise or btq_eval_deterministic:
            return None
        seq_len, batch = input.shape[:2]
        shape = (seq_len, self.noise_slots, batch, self.hidden_size)
        return torch.rand(shape, generator=generator, device=input.device, dtype=input.dtype)

    def _run_layers(
        self,
        input: Tensor,
        initial_states: list[object],
        step: CellStep,
        output_of: Callable[[object], Tensor],
        generator: torch.Generator | None,
    ) -> tuple[Tensor, list[object]]:
        """Runs ``step`` over time for each layer, with dropout between layers as torch does."""
        layer_input = input
        final_states = []
        for layer, state in enumerate(initial_states):
            w_ih, w_hh, b_ih, b_hh = self._quantized_weights(layer)
            # The input projection needs no recurrence: one matmul for the whole sequence.
            projected = F.linear(layer_input, w_ih, b_ih)
            uniform = self._draw_uniform(layer_input, generator)
            outputs = []
            for t in range(layer_input.size(0)):
                state = step(
                    projected[t], state, w_hh, b_hh, None if uniform is None else uniform[t]
                )
                outputs.append(output_of(state))
            layer_input = torch.stack(outputs)
            final_states.append(state)
            if layer < self.num_layers - 1 and self.dropout > 0:
                layer_input = F.dropout(layer_input, self.dropout, self.training)
        return layer_input, final_states


def _slot(uniform: Tensor | None, index: int) -> Tensor | None:
    return None if uniform is None else uniform[index]


class SlopedLSTM(_SlopedRecurrence, nn.LSTM):
    """``torch.nn.LSTM`` (sequence-first) with sloping factors and HitNet quantization."""

    noise_slots = 5  # i, f, g, o, h

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
        nn.LSTM.__init__(self, input_size, hidden_size, num_layers=num_layers, dropout=dropout)
        self._init_hitnet(quant or QuantConfig(), lambda_sigma, lambda_tanh, fused_full_precision)

    def forward(  # type: ignore[override]
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        self._check_input(input)
        if self.uses_fused_kernel:
            return nn.LSTM.forward(self, input, hx)
        if hx is None:
            zeros = input.new_zeros(self.num_layers, input.size(1), self.hidden_size)
            hx = (zeros, zeros)
        initial = [(hx[0][layer], hx[1][layer]) for layer in range(self.num_layers)]
        output, final = self._run_layers(input, initial, self._step, lambda s: s[0], generator)
        h_n = torch.stack([h for h, _ in final])
        c_n = torch.stack([c for _, c in final])
        return output, (h_n, c_n)

    def _step(
        self,
        projected: Tensor,
        state: tuple[Tensor, Tensor],
        w_hh: Tensor,
        b_hh: Tensor,
        uniform: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        h, c = state
        gates = projected + F.linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        ls, lt = self.lambda_sigma, self.lambda_tanh
        i = self.gate_quantizer(torch.sigmoid(ls * i), _slot(uniform, 0))
        f = self.gate_quantizer(torch.sigmoid(ls * f), _slot(uniform, 1))
        g = self.candidate_quantizer(torch.tanh(lt * g), _slot(uniform, 2))
        o = self.gate_quantizer(torch.sigmoid(ls * o), _slot(uniform, 3))
        c = f * c + i * g  # the cell state is an accumulator: it stays full precision
        h = self.hidden_quantizer(o * torch.tanh(lt * c), _slot(uniform, 4))
        return h, c


class SlopedGRU(_SlopedRecurrence, nn.GRU):
    """``torch.nn.GRU`` (sequence-first) with sloping factors and HitNet quantization."""

    noise_slots = 4  # r, z, n, h

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
        nn.GRU.__init__(self, input_size, hidden_size, num_layers=num_layers, dropout=dropout)
        self._init_hitnet(quant or QuantConfig(), lambda_sigma, lambda_tanh, fused_full_precision)

    def forward(  # type: ignore[override]
        self,
        input: Tensor,
        hx: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        self._check_input(input)
        if self.uses_fused_kernel:
            return nn.GRU.forward(self, input, hx)
        if hx is None:
            hx = input.new_zeros(self.num_layers, input.size(1), self.hidden_size)
        initial = list(hx.unbind(0))
        output, final = self._run_layers(input, initial, self._step, lambda s: s, generator)
        return output, torch.stack(final)

    def _step(
        self,
        projected: Tensor,
        h: Tensor,
        w_hh: Tensor,
        b_hh: Tensor,
        uniform: Tensor | None,
    ) -> Tensor:
        x_r, x_z, x_n = projected.chunk(3, dim=1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
        ls, lt = self.lambda_sigma, self.lambda_tanh
        r = self.gate_quantizer(torch.sigmoid(ls * (x_r + h_r)), _slot(uniform, 0))
        z = self.gate_quantizer(torch.sigmoid(ls * (x_z + h_z)), _slot(uniform, 1))
        n = self.candidate_quantizer(torch.tanh(lt * (x_n + r * h_n)), _slot(uniform, 2))
        return self.hidden_quantizer((1 - z) * n + z * h, _slot(uniform, 3))


RECURRENT_LAYERS: dict[str, type[SlopedLSTM] | type[SlopedGRU]] = {
    "lstm": SlopedLSTM,
    "gru": SlopedGRU,
}
