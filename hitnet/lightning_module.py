"""The training procedure: truncated BPTT, per-epoch perplexities, SGD with lr/4 on plateau.

Lightning 2 has no built-in truncated BPTT, so each batch is one bptt window from an
unshuffled loader and the module carries the detached hidden state from batch to batch.
Hidden-state policy: reset to zeros at the start of every train/val/test epoch, carried
(and detached) across the batches of an epoch; checkpoints are taken at epoch ends, so a
resumed run starts its next epoch exactly as an uninterrupted one.

The module computes the losses and logs the perplexities; each other part does one job and
comes as a callback the task brings along (``configure_callbacks``):
- ``hitnet.lr_schedule``: the lr schedule (plateau or milestones), stepped after validation;
- ``hitnet.rng_resume``: the RNG states in checkpoints, so a resumed run draws the same
  dropout masks and BTQ noise;
- ``hitnet.averaging``: from epoch ``average_from_epoch`` on, averaged SGD (the lr stays where
  it is, and the running mean of the weights is what validation measures and checkpoints save);
- ``hitnet.warmup``: with ``activation_warmup_steps``, the activations' quantization noise
  coming in over the first steps.
Optionally the loss also distils from a frozen teacher (``set_teacher``, ``hitnet.distillation``).

``train_ppl`` and ``lr`` are logged from the epoch's last training batch, so that every
callback reads them in its ``on_train_epoch_end`` (Lightning calls ordinary callbacks' epoch-end
hooks before the module's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from annotated_types import Interval, MinLen
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from hitnet.averaging import AveragedSGD
from hitnet.constraints import (
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    checked_arguments,
)
from hitnet.distillation import Distillation
from hitnet.language_model import ModelConfig, RecurrentState, RNNLanguageModel, detach_state
from hitnet.lr_schedule import LRStepAfterValidation, lr_schedule
from hitnet.lr_schedule import step_lr_schedule as step_lr_schedule  # hitnet.multirun_task's
from hitnet.rng_resume import ResumeRNG
from hitnet.warmup import ActivationWarmup

SPLIT_METRIC = {"train": "train_ppl", "val": "val_ppl", "test": "test_ppl"}
# exp() of a mean NLL above this overflows float64: a diverged run, not a perplexity
MAX_MEAN_NLL = 700.0


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite (or too large to exponentiate): the run diverged."""


@dataclass
class _Pass:
    """One epoch's pass over a split: the hidden state carried from window to window, the
    summed NLL and token count of its perplexity, and (evaluation) the BTQ generator."""

    nll_sum: Tensor
    generator: torch.Generator | None = None
    state: RecurrentState | None = None
    token_count: int = 0


class LanguageModelTask(pl.LightningModule):
    """Trains and evaluates an ``RNNLanguageModel``; logs train/val/test perplexity per epoch.

    ``eval_seed`` seeds the Bernoulli draws of stochastic BTQ during validation and test,
    so evaluating the same weights twice gives the same perplexity.
    """

    @checked_arguments  # the ranges declared below (params.yaml's recipe keys take them too)
    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        lr: PositiveFloat = 20.0,
        lr_decay: Annotated[float, Interval(gt=0, lt=1)] = 0.25,
        lr_patience: NonNegativeInt = 0,
        # an epoch counts as an improvement only if it lowers the best val PPW by this fraction
        lr_threshold: Probability = 0.0,
        # epochs after which the lr is multiplied by lr_decay, whatever validation says; set,
        # it replaces the plateau rule (lr_patience, lr_threshold)
        lr_milestones: Annotated[list[PositiveInt], MinLen(1)] | None = None,
        eval_seed: NonNegativeInt = 0,
        # weight of distillation from the FP model, the teacher (0: plain cross-entropy)
        distill_weight: Fraction = 0.0,
        distill_temperature: PositiveFloat = 1.0,
        # averaged SGD from this epoch on: the lr stays, and the running mean of the weights
        # is what validation measures and checkpoints save
        average_from_epoch: PositiveInt | None = None,
        # the activations' quantization noise comes in linearly over this many optimizer
        # steps (0: fully quantized from the first step)
        activation_warmup_steps: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        config = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        if lr_milestones is not None and sorted(set(lr_milestones)) != lr_milestones:
            raise ValueError(f"lr_milestones must be increasing epochs, got {lr_milestones}")
        # the parts that come as callbacks, built (and so checked) now
        self._parts: list[Callback] = [
            LRStepAfterValidation("val_ppl", hold_from_epoch=average_from_epoch),
            ResumeRNG(),
        ]
        if average_from_epoch is not None:
            self._parts.append(AveragedSGD(average_from_epoch))
        if activation_warmup_steps:  # a negative count is refused by ActivationWarmup
            self._parts.append(ActivationWarmup(activation_warmup_steps))
        self.save_hyperparameters(
            {
                "model": config.to_dict(),
                "lr": lr,
                "lr_decay": lr_decay,
                "lr_patience": lr_patience,
                "lr_threshold": lr_threshold,
                "lr_milestones": lr_milestones,
                "eval_seed": eval_seed,
                "distill_weight": distill_weight,
                "distill_temperature": distill_temperature,
                "average_from_epoch": average_from_epoch,
                "activation_warmup_steps": activation_warmup_steps,
            }
        )
        self.model = RNNLanguageModel(config)
        # training's pass and evaluation's are kept apart: validation runs mid-epoch
        self._train_pass: _Pass | None = None
        self._eval_pass: _Pass | None = None
        self._distillation: Distillation | None = None

    def set_teacher(self, teacher: RNNLanguageModel) -> None:
        """Distils from ``teacher`` (the full-precision model) while training.

        The training loss becomes (1 - w) * cross-entropy + w * T^2 * KL(teacher || model)
        on softmaxes at temperature T. The teacher is frozen and not part of this module's
        state_dict: checkpoints hold the ternary model only.
        """
        if self.hparams.distill_weight == 0:
            raise ValueError("set_teacher needs distill_weight > 0")
        self._distillation = Distillation(teacher, self.hparams.distill_temperature)

    def configure_callbacks(self) -> list[Callback]:
        return self._parts

    # --- shared by train / val / test -------------------------------------------------
    def _start_pass(self, seeded: bool) -> _Pass:
        generator = None
        if seeded:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.hparams.eval_seed)
        return _Pass(torch.zeros((), device=self.device), generator)

    def _window_loss(self, batch: tuple[Tensor, Tensor], run: _Pass) -> tuple[Tensor, Tensor]:
        """Cross-entropy of one window (accumulated for the epoch's perplexity) and logits."""
        inputs, targets = batch
        if run.state is None:
            run.state = self.model.initial_state(inputs.size(1), self.device)
        logits, state = self.model(inputs, run.state, generator=run.generator)
        run.state = detach_state(state)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        run.nll_sum += loss.detach() * targets.numel()
        run.token_count += targets.numel()
        return loss, logits

    def _log_perplexity(self, split: str, run: _Pass, **log_options: Any) -> None:
        """Logs the epoch's perplexity; raises ``TrainingDiverged`` for a NaN or overflowing
        loss before anything (a checkpoint, a metric) records it."""
        mean_nll = run.nll_sum.item() / max(run.token_count, 1)
        if not math.isfinite(mean_nll) or mean_nll > MAX_MEAN_NLL:
            raise TrainingDiverged(
                f"training diverged: the {split} loss is {mean_nll:g} at epoch "
                f"{self.current_epoch + 1} (lr {self.hparams.lr:g}); try a lower lr"
            )
        self.log(SPLIT_METRIC[split], math.exp(mean_nll), prog_bar=True, **log_options)

    # --- training ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._train_pass = self._start_pass(seeded=False)
        if self._distillation is not None:
            self._distillation.start_epoch(self.device)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits = self._window_loss(batch, self._train_pass)
        self.log("train_loss", loss, prog_bar=True)
        if self.trainer.is_last_batch:
            # Logged as epoch values once, here, so callbacks see them at epoch end; the lr
            # is the one this epoch trained with (its step comes after validation).
            once = {"on_step": False, "on_epoch": True, "batch_size": 1}
            self._log_perplexity("train", self._train_pass, **once)  # the plain cross-entropy
            self.log("lr", self.optimizers().param_groups[0]["lr"], **once)
        if self._distillation is None:
            return loss
        weight = self.hparams.distill_weight
        return (1 - weight) * loss + weight * self._distillation.loss(batch[0], logits)

    # --- evaluation -------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_pass = self._start_pass(seeded=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._window_loss(batch, self._eval_pass)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val", self._eval_pass)

    def on_test_epoch_start(self) -> None:
        self._eval_pass = self._start_pass(seeded=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._window_loss(batch, self._eval_pass)

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test", self._eval_pass)

    # --- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        # not handed to Lightning: LRStepAfterValidation steps it and checkpoints its state
        self.lr_schedule = lr_schedule(optimizer, self.hparams)
        return optimizer
