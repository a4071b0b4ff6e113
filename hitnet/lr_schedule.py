"""The lr schedule: either lr * lr_decay after fixed epochs, or (the classic PTB recipe) lr / 4
as soon as validation perplexity fails to improve; stepped once after each epoch's validation.

``LRStepAfterValidation`` steps it there rather than leaving it to Lightning, which steps
epoch schedules after the epoch's end hooks: an end-of-epoch checkpoint must already hold that
epoch's step for a resumed run to go on exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from hitnet.checkpointed_state import CheckpointedState

LRSchedule = torch.optim.lr_scheduler.LRScheduler | ReduceLROnPlateau
CHECKPOINT_KEY = "hitnet_lr_schedule"  # where checkpoints hold the schedule's state


def lr_schedule(optimizer: torch.optim.Optimizer, hparams: Any) -> LRSchedule:
    """Either lr * lr_decay after each epoch of lr_milestones, or (the classic PTB recipe)
    lr / 4 as soon as validation perplexity fails to improve; with lr_threshold, an epoch
    improves only if it beats the best by that fraction."""
    milestones = hparams.get("lr_milestones")
    if milestones:
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=milestones, gamma=hparams["lr_decay"]
        )
    return ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=hparams["lr_decay"],
        patience=hparams["lr_patience"],
        threshold=hparams["lr_threshold"],
        threshold_mode="rel",
    )


def step_lr_schedule(schedule: LRSchedule, val_ppl: float) -> None:
    """One epoch's step: the plateau rule reads validation; fixed milestones are blind to the
    noise of a ternary model's val curve."""
    if isinstance(schedule, ReduceLROnPlateau):
        schedule.step(val_ppl)
    else:
        schedule.step()


class LRStepAfterValidation(CheckpointedState):
    """Steps the module's ``lr_schedule`` (built by its ``configure_optimizers``) with the
    logged ``monitor`` once each fitting epoch's validation is over, and keeps the schedule's
    state in checkpoints. From epoch ``hold_from_epoch`` (counted from 1) on it steps no more:
    averaged SGD keeps the lr where it is."""

    checkpoint_key = CHECKPOINT_KEY

    def __init__(self, monitor: str = "val_ppl", hold_from_epoch: int | None = None) -> None:
        super().__init__()
        self.monitor = monitor
        self.hold_from_epoch = hold_from_epoch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_validation_end, not epoch end: the module logs the monitor in its own epoch-end
        # hook, which Lightning calls after the callbacks'. Checkpoint callbacks run after this.
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        hold = self.hold_from_epoch
        if hold is None or trainer.current_epoch + 1 < hold:
            step_lr_schedule(pl_module.lr_schedule, float(trainer.callback_metrics[self.monitor]))

    def saved_state(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        return pl_module.lr_schedule.state_dict()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resumed = self.take_resumed()  # the optimizer, and so the schedule, exist by now
        if resumed is not None:
            pl_module.lr_schedule.load_state_dict(resumed)
