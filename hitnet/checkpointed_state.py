"""A callback's share of a checkpoint: training state Lightning does not restore itself (the
RNG, a hand-stepped lr schedule), saved under one key and handed back on resume."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn


class CheckpointedState(Callback):
    """Saves ``saved_state(pl_module)`` under ``checkpoint_key`` in every checkpoint. When a
    fit resumes, the saved state waits in ``take_resumed()`` until the subclass applies it:
    checkpoints load before the optimizer exists, and before the sanity check draws."""

    checkpoint_key: str

    def __init__(self) -> None:
        self._resumed: Any = None

    def saved_state(self, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def take_resumed(self) -> Any:
        """The state a resumed fit loaded (None when there is none, or once taken)."""
        resumed, self._resumed = self._resumed, None
        return resumed

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[self.checkpoint_key] = self.saved_state(pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._resumed = checkpoint.get(self.checkpoint_key)
