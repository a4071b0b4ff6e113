"""Word-level recurrent language model: embedding, dropout, recurrent layer, dropout, decoder.

One class serves full precision and ternary: quantization lives in the recurrent layer's
``QuantConfig``; the embedding and decoder stay full precision unless
``ternary_embedding_decoder`` asks for TTQ on their weights too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hitnet.constraints import PositiveFloat, PositiveInt, Probability, check_fields
from hitnet.noise import dropout
from hitnet.quantizers import BTQEvalMode, QuantConfig, ternarize_threshold
from hitnet.recurrent import RECURRENT_LAYERS

CellType = Literal["lstm", "gru"]
RecurrentState = Tensor | tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes a language model; its fields are the checkpoint's hparams."""

    vocab_size: PositiveInt
    cell: CellType = "lstm"
    embedding_size: PositiveInt = 300
    hidden_size: PositiveInt = 300
    num_layers: PositiveInt = 1
    dropout: Probability = 0.5
    tie_weights: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)
    lambda_sigma: PositiveFloat = 1.0
    lambda_tanh: PositiveFloat = 1.0
    ternary_embedding_decoder: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ValueError(
                "tie_weights needs embedding_size == hidden_size, got "
                f"{self.embedding_size} and {self.hidden_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so checkpoints load with ``torch.load(weights_only=True)``."""
        fields = asdict(self)
        fields["quant"]["activations"] = sorted(self.quant.activations)
        return fields

    def full_precision(self) -> ModelConfig:
        """The same model with quantization off and slopes 1 (what a ternary one starts from)."""
        return replace(
            self,
            quant=QuantConfig(),
            lambda_sigma=1.0,
            lambda_tanh=1.0,
            ternary_embedding_decoder=False,
        )

    def evaluated_as(self, btq_eval: BTQEvalMode) -> ModelConfig:
        """The same model with its BTQ evaluated as ``btq_eval`` says (training is unchanged)."""
        return replace(self, quant=replace(self.quant, btq_eval=btq_eval))

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ModelConfig:
        return cls(**{**fields, "quant": QuantConfig(**fields.get("quant", {}))})


def embedding_decoder_weight(config: ModelConfig, weight: Tensor, run_dims: int = 0) -> Tensor:
    """The embedding's or decoder's weight as the model computes with it: TTQ'd when
    ``ternary_embedding_decoder`` says so (each of ``run_dims`` stacked runs' on its own)."""
    if not config.ternary_embedding_decoder:
        return weight
    quant = config.quant
    return ternarize_threshold(
        weight, quant.ttq_threshold, quant.ttq_scaled, quant.ttq_per_row, run_dims
    )


class RNNLanguageModel(nn.Module):
    """Predicts the next token at every position of a (seq_len, batch) token tensor."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.dropout = nn.Dropout(config.dropout)
        self.recurrent = RECURRENT_LAYERS[config.cell](
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            quant=config.quant,
            lambda_sigma=config.lambda_sigma,
            lambda_tanh=config.lambda_tanh,
        )
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self._init_embedding_decoder()

    def _init_embedding_decoder(self) -> None:
        # The word_language_model initialisation; the recurrent layer keeps torch's default.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> RecurrentState:
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        zeros = torch.zeros(shape, device=device)
        paired = self.config.cell == "lstm" or self.config.quant.gru_accumulator
        return (zeros, zeros.clone()) if paired else zeros

    def forward(
        self,
        tokens: Tensor,
        state: RecurrentState | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, RecurrentState]:
        """Returns logits of shape (seq_len, batch, vocab) and the final recurrent state.

        ``generator``: what this pass draws its noise from (dropout masks, BTQ); None: torch's
        global RNG.
        """
        config, p, training = self.config, self.dropout.p, self.training
        embedded = F.embedding(tokens, embedding_decoder_weight(config, self.embedding.weight))
        embedded = dropout(embedded, p, training, generator)
        output, state = self.recurrent(embedded, state, generator=generator)
        output = dropout(output, p, training, generator)
        logits = F.linear(
            output, embedding_decoder_weight(config, self.decoder.weight), self.decoder.bias
        )
        return logits, state


def detach_state(state: RecurrentState) -> RecurrentState:
    """Cuts the graph at a batch boundary (truncated BPTT) while keeping the values."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()
