"""Activation warm-up: the activations' quantization noise comes in linearly over the first
optimizer steps of a ternary run (``hitnet.quantizers.set_activation_noise``). The level follows
``global_step``, so a resumed run goes on where it stopped."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from hitnet.quantizers import set_activation_noise


class ActivationWarmup(Callback):
    """Step k (from 0) trains with (k + 1) / ``steps`` of the noise; from k = steps - 1, all."""

    def __init__(self, steps: int) -> None:
        if steps < 0:
            raise ValueError(f"activation_warmup_steps must be >= 0, got {steps}")
        self.steps = steps

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        set_activation_noise(pl_module.model, min(1.0, (trainer.global_step + 1) / self.steps))
