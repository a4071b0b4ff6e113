"""Exact resume of the random draws: checkpoints hold torch's RNG states, and a resumed run
sets them as its first epoch starts, so it draws the same dropout masks and BTQ noise as an
uninterrupted run. Lightning restores the loops, the optimizer and the schedulers, but not the
global RNG.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from hitnet.checkpointed_state import CheckpointedState

CHECKPOINT_KEY = "hitnet_rng"  # where checkpoints hold the RNG states


class ResumeRNG(CheckpointedState):
    checkpoint_key = CHECKPOINT_KEY

    def saved_state(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Applied here, not at load time: the sanity check and loader set-up that precede a
        # resumed epoch draw from the RNG, which the uninterrupted run never did.
        resumed = self.take_resumed()
        if resumed is None:
            return
        torch.set_rng_state(resumed["cpu"])
        if resumed["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resumed["cuda"])
