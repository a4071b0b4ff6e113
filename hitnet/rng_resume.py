"""Exact resume of the random draws: checkpoints hold torch's RNG states, and a resumed run
sets them as its first epoch starts, so it draws the same dropout masks and BTQ noise as an
uninterrupted run. Lightning restores the loops, the optimizer and the schedulers, but not the
global RNG.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

CHECKPOINT_KEY = "hitnet_rng"  # where checkpoints hold the RNG states


class ResumeRNG(Callback):
    def __init__(self) -> None:
        self._resumed: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        checkpoint[CHECKPOINT_KEY] = {"cpu": torch.get_rng_state(), "cuda": cuda}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._resumed = checkpoint.get(CHECKPOINT_KEY)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Applied here, not at load time: the sanity check and loader set-up that precede a
        # resumed epoch draw from the RNG, which the uninterrupted run never did.
        if self._resumed is None:
            return
        torch.set_rng_state(self._resumed["cpu"])
        if self._resumed["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._resumed["cuda"])
        self._resumed = None
