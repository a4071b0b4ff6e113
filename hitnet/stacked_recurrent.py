"""R independent runs of one sloped LSTM / GRU layer, stacked: one forward pass for all runs.

Every parameter of ``SlopedLSTM`` / ``SlopedGRU`` gains a leading run dimension (R, ...) under
the same name, so run r's slice of the state_dict is a single-run layer's state_dict. The
recurrence is the single run's own (``hitnet.recurrent.run_layer`` and its step functions,
compiled the same way by ``compile_recurrence``): with stacked weights its matmuls become
batched matmuls (``hitnet.recurrent.linear``) and its elementwise work simply covers R times
as many units, so a latency-bound step does R runs' work in about the same kernels.

Why stacked parameters and not ``torch.func`` (``stack_module_state`` + ``functional_call``
under ``vmap``): the straight-through quantizers are an old-style ``autograd.Function``, which
vmap refuses without a rewrite; vmap's randomness cannot reproduce each run's own dropout and
BTQ draws, so the noise would have to be drawn outside and passed in anyway; and eager vmap
adds dispatch cost to each of the recurrence's per-step ops. The only per-run reductions are
TTQ's thresholds and scales (``run_dims``), and per-run noise is drawn as a single run draws
it, from each run's own generator (``hitnet.noise``).

Shapes: input (T, R, B, input), output (T, R, B, H), state (num_layers, R, B, H) (a pair for
the LSTM and the GRU with an accumulator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hitnet.noise import Generators, per_run, per_run_dropout
from hitnet.noise import uniform as draw_uniform
from hitnet.recurrent import SlopedGRU, SlopedLSTM, _SlopedRecurrence

StackedState = Tensor | tuple[Tensor, Tensor]


class _Sizes(nn.Module):
    """Stands where torch.nn.LSTM / GRU stand under ``_SlopedRecurrence``: the sizes it reads.
    ``StackedRecurrence`` adds the (stacked) parameters."""

    batch_first = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = dropout


class StackedRecurrence(_SlopedRecurrence, _Sizes):
    """The layers of R runs (same class, sizes, quantization and slopes) as one module.

    Weight BTQ is refused: its draws come from torch's global RNG inside the quantizer, not
    from a run's generator, so stacked runs could not reproduce single ones. Stacked runs
    always take the reference loop: a full-precision single run of several layers on torch's
    fused kernel draws its between-layer dropout inside that kernel, and they equal it only
    on its reference loop (``fused_full_precision=False``).
    """

    run_dims = 1

    def __init__(self, layers: Sequence[SlopedLSTM | SlopedGRU]) -> None:
        first = layers[0]
        shape = _layer_shape(first)
        for layer in layers[1:]:
            if _layer_shape(layer) != shape:
                raise ValueError(
                    "stacked runs need layers of one class, sizes, quantization and slopes; "
                    f"got {shape} and {_layer_shape(layer)}"
                )
        if first.quant.weight == "btq":
            raise ValueError("stacked runs cannot take weight BTQ (it draws from the global RNG)")
        super().__init__(
            first.input_size,
            first.hidden_size,
            num_layers=first.num_layers,
            dropout=first.dropout,
            quant=first.quant,
            lambda_sigma=first.lambda_sigma,
            lambda_tanh=first.lambda_tanh,
            fused_full_precision=False,
        )
        self.cell_type = first.cell_type
        self.noise_slots = first.noise_slots
        self.runs = len(layers)
        self.compile_recurrence(first.compile_mode)  # compiled as the single runs were
        for name, _ in first.named_parameters():
            stacked = torch.stack([layer.get_parameter(name).detach() for layer in layers])
            self.register_parameter(name, nn.Parameter(stacked))

    def zero_state(self, batch: int, like: Tensor) -> StackedState:
        zeros = like.new_zeros(self.num_layers, self.runs, batch, self.hidden_size)
        return (zeros, zeros.clone()) if self.paired_state else zeros

    def forward(
        self, input: Tensor, hx: StackedState | None = None, generators: Generators | None = None
    ) -> tuple[Tensor, StackedState]:
        """``generators``: one per run, each run's noise drawn from its own (None: all from
        torch's global RNG, run after run)."""
        expected = ("T", self.runs, "B", self.input_size)
        if input.dim() != 4 or (input.size(1), input.size(3)) != expected[1::2]:
            raise ValueError(f"expected input of shape {expected}, got {tuple(input.shape)}")
        if hx is None:
            hx = self.zero_state(input.size(2), input)
        state_shape = (self.num_layers, self.runs, input.size(2), self.hidden_size)
        for state in hx if isinstance(hx, tuple) else (hx,):
            if tuple(state.shape) != state_shape:
                raise ValueError(
                    f"expected states of shape {state_shape}, got {tuple(state.shape)}"
                )
        output, final = self._run_layers(input, self._per_layer(hx), self.generators(generators))
        return output, self._joined(final)

    def generators(self, generators: Generators | None) -> Generators:
        """One generator (or None) per run."""
        if generators is None:
            return [None] * self.runs
        if len(generators) != self.runs:
            raise ValueError(f"need one generator per run ({self.runs}), got {len(generators)}")
        return generators

    def _draw_uniform(self, input: Tensor, generators: Generators) -> Tensor | None:
        """Each run's draws as a single run draws them, stacked: (T, slot, R, B, H)."""
        if not self.draws_noise:
            return None
        seq_len, _, batch = input.shape[:3]
        shape = (seq_len, self.noise_slots, batch, self.hidden_size)
        return per_run(lambda generator: draw_uniform(shape, input, generator), generators, 2)

    def _dropout(self, layer_input: Tensor, generators: Generators) -> Tensor:
        return per_run_dropout(layer_input, self.dropout, self.training, generators, run_dim=1)


def _layer_shape(layer: SlopedLSTM | SlopedGRU) -> tuple[object, ...]:
    """What stacked layers must share."""
    return (
        type(layer),
        layer.input_size,
        layer.hidden_size,
        layer.num_layers,
        layer.dropout,
        layer.quant,
        layer.lambda_sigma,
        layer.lambda_tanh,
    )
