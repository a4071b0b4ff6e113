"""The MLflow model of a trained language model: token ids in, next-token logits out.

MLflow logs it "from code": this file is copied into the model as it is, the ``hitnet`` library
beside it, and the checkpoint as the model's artifact; loading needs torch and hitnet only.
A ternary model is served with BTQ rounded, so the same tokens always give the same logits.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
import numpy as np
import torch

from hitnet.language_model import ModelConfig, RNNLanguageModel

# predict has no type hints: MLflow would take them for the schema (and asks for them),
# while the logged signature is the schema here
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class NextTokenLogits(mlflow.pyfunc.PythonModel):
    """``predict``: int64 token ids of shape (seq_len, batch) -> float32 logits of shape
    (seq_len, batch, vocab), from a zero recurrent state."""

    def load_context(self, context: Any) -> None:
        saved = torch.load(context.artifacts["checkpoint"], map_location="cpu", weights_only=True)
        config = ModelConfig.from_dict(saved["hyper_parameters"]["model"])
        self.model = RNNLanguageModel(config.evaluated_as("deterministic")).eval()
        weights = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
        self.model.load_state_dict(weights)

    def predict(self, context, model_input, params=None):
        tokens = torch.as_tensor(np.asarray(model_input), dtype=torch.long)
        with torch.no_grad():
            logits, _ = self.model(tokens)
        return logits.numpy()


mlflow.models.set_model(NextTokenLogits())
