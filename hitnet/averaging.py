"""Averaged SGD: from a given epoch on, the model validated and saved is the running mean of
the weights over every optimizer step since (AWD-LSTM's NT-ASGD lets a noisy SGD trajectory
settle this way). For a ternary model the mean is of the full-precision shadow weights, which
are then ternarized as usual.

Lightning's ``WeightAveraging`` keeps the mean (torch's ``AveragedModel``), swaps it in for
validation and checkpoints it as the model, with the training weights beside it. What it does
not do is added here, because averaging starts late in the run: until the first step is
averaged, its "mean" is only the copy taken at set-up, so the model is left alone (no swap, no
save, no copy at the end); a checkpoint taken while the mean is swapped in still saves the mean
as the model; and a checkpoint loaded to test is tested as saved, the mean (Lightning puts the
training weights back whenever it loads one), without a warning.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class AveragedSGD(WeightAveraging):
    """Averages every optimizer step from epoch ``from_epoch`` (counted from 1) on."""

    def __init__(self, from_epoch: int) -> None:
        if from_epoch < 1:
            raise ValueError(f"average_from_epoch counts from 1, got {from_epoch}")
        super().__init__()
        self.from_epoch = from_epoch
        self._epoch = 0  # the epoch training is in (should_update is not given the trainer)
        self._swapped = False  # True while validation runs on the mean

    @property
    def started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self._epoch + 1 >= self.from_epoch

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started:
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started:  # after training, the module is the averaged model
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.started:
            return
        held = self._average_model.state_dict()  # the mean, or the training weights if swapped
        prefix = "module."
        other = {name[len(prefix) :]: v for name, v in held.items() if name.startswith(prefix)}
        if self._swapped:  # the module holds the mean already
            checkpoint["current_model_state"] = other
        else:
            checkpoint["current_model_state"] = checkpoint["state_dict"]
            checkpoint["state_dict"] = other
        checkpoint["averaging_state"] = {
            name: value for name, value in held.items() if not name.startswith(prefix)
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Only to go on training: a checkpoint loaded to test or validate is its model, the mean.
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._average_model is not None and "averaging_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
