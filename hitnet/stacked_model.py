"""R independent runs of one ``RNNLanguageModel`` config stacked into one model.

Built from R single-run models (``StackedLanguageModel(models)``); every parameter gains a
leading run dimension under its single-run name, so ``run_state_dict(r)`` is run r's model as
a single-run state_dict (what checkpoints, the report and export read). All runs read the same
token batch; each has its own weights and, through its own generator, its own dropout masks
and BTQ draws (``hitnet.noise``), so R stacked runs compute what R single runs compute.

Shapes: tokens (T, B); logits (R, T, B, vocab); state (num_layers, R, B, H) (a pair for the
LSTM and the GRU with an accumulator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hitnet.language_model import ModelConfig, RNNLanguageModel, embedding_decoder_weight
from hitnet.noise import Generators, per_run_dropout
from hitnet.recurrent import linear
from hitnet.stacked_recurrent import StackedRecurrence, StackedState


class StackedLanguageModel(nn.Module):
    """Embedding, dropout, recurrent layer, dropout, decoder: R runs' worth in one pass."""

    def __init__(self, models: Sequence[RNNLanguageModel]) -> None:
        super().__init__()
        if not models:
            raise ValueError("stacked runs need at least one model")
        configs = {model.config for model in models}
        if len(configs) != 1:
            raise ValueError(f"stacked runs need one model config, got {len(configs)}")
        self.config: ModelConfig = models[0].config
        self.runs = len(models)

        def stacked(name: str) -> nn.Parameter:
            return nn.Parameter(torch.stack([m.get_parameter(name).detach() for m in models]))

        # Parameter containers named as the single model's modules: the same state_dict keys.
        self.embedding = nn.ParameterDict({"weight": stacked("embedding.weight")})
        self.recurrent = StackedRecurrence([model.recurrent for model in models])
        tied = self.config.tie_weights
        decoder_weight = self.embedding["weight"] if tied else stacked("decoder.weight")
        self.decoder = nn.ParameterDict({"weight": decoder_weight, "bias": stacked("decoder.bias")})

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> StackedState:
        return self.recurrent.zero_state(batch_size, torch.empty((), device=device))

    def run_state_dict(self, run: int) -> dict[str, Tensor]:
        """Run ``run``'s weights as a single-run ``RNNLanguageModel`` state_dict."""
        return {name: value[run].clone() for name, value in self.state_dict().items()}

    def forward(
        self,
        tokens: Tensor,
        state: StackedState | None = None,
        generators: Generators | None = None,
    ) -> tuple[Tensor, StackedState]:
        """Logits (R, T, B, vocab) and the final state; ``generators``: one per run."""
        generators = self.recurrent.generators(generators)
        p, training, runs = self.config.dropout, self.training, self.runs
        embedding = self._weight(self.embedding["weight"])
        embedded = embedding[:, tokens].transpose(0, 1)  # (T, R, B, E): time first
        embedded = per_run_dropout(embedded, p, training, generators, run_dim=1)
        output, state = self.recurrent(embedded, state, generators)
        output = per_run_dropout(output, p, training, generators, run_dim=1)
        seq_len, _, batch, hidden = output.shape
        by_run = output.transpose(0, 1).reshape(runs, seq_len * batch, hidden)
        logits = linear(by_run, self._weight(self.decoder["weight"]), self.decoder["bias"])
        return logits.view(runs, seq_len, batch, -1), state

    def _weight(self, weight: Tensor) -> Tensor:
        return embedding_decoder_weight(self.config, weight, run_dims=1)
