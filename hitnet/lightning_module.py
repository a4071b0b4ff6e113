"""The training procedure: truncated BPTT, per-epoch perplexities, SGD with lr/4 on plateau.

Lightning 2 has no built-in truncated BPTT, so each batch is one bptt window from an
unshuffled loader and the module carries the detached hidden state from batch to batch.
Hidden-state policy: reset to zeros at the start of every train/val/test epoch, carried
(and detached) across the batches of an epoch; checkpoints are taken at epoch ends, so a
resumed run starts its next epoch exactly as an uninterrupted one. Checkpoints also hold the
RNG states, so a resumed run draws the same dropout masks and BTQ noise.

Optionally the loss also distils from a frozen teacher (the full-precision model a ternary one
starts from): its softmax is a second, soft target (``set_teacher``). Two more parts come as
callbacks the task brings along (``configure_callbacks``): from epoch ``average_from_epoch`` on,
averaged SGD (``hitnet.averaging``: the lr stays where it is, and the running mean of the
weights is what validation measures and checkpoints save); and with ``activation_warmup_steps``,
the activations' quantization noise coming in over the first steps (``hitnet.warmup``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from annotated_types import Interval, MinLen
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau

from hitnet.averaging import AveragedSGD
from hitnet.constraints import (
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    checked_arguments,
)
from hitnet.language_model import ModelConfig, RecurrentState, RNNLanguageModel, detach_state
from hitnet.warmup import ActivationWarmup

SPLIT_METRIC = {"train": "train_ppl", "val": "val_ppl", "test": "test_ppl"}
# exp() of a mean NLL above this overflows float64: a diverged run, not a perplexity
MAX_MEAN_NLL = 700.0


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite (or too large to exponentiate): the run diverged."""


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
        self._parts: list[Callback] = []
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
        self._state: RecurrentState | None = None
        self._generator: torch.Generator | None = None
        self._nll_sum: Tensor | None = None
        self._token_count = 0
        self._resumed_rng: dict[str, Any] | None = None
        self._resumed_schedule: dict[str, Any] | None = None
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

    def _averaging(self) -> bool:
        """True from the epoch averaged SGD starts: the lr then stays where it is."""
        start = self.hparams.average_from_epoch
        return start is not None and self.current_epoch + 1 >= start

    # --- shared by train / val / test -------------------------------------------------
    def _start_epoch(self, seeded: bool) -> None:
        self._state = None
        self._nll_sum = torch.zeros((), device=self.device)
        self._token_count = 0
        self._generator = None
        if seeded:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.eval_seed)

    def _window_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-entropy of one window (accumulated for the epoch's perplexity) and logits."""
        inputs, targets = batch
        if self._state is None:
            self._state = self.model.initial_state(inputs.size(1), self.device)
        logits, state = self.model(inputs, self._state, generator=self._generator)
        self._state = detach_state(state)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        self._nll_sum += loss.detach() * targets.numel()
        self._token_count += targets.numel()
        return loss, logits

    def _log_perplexity(self, split: str) -> float:
        """Logs the epoch's perplexity; raises ``TrainingDiverged`` for a NaN or overflowing
        loss before anything (a checkpoint, a metric) records it."""
        mean_nll = self._nll_sum.item() / max(self._token_count, 1)
        if not math.isfinite(mean_nll) or mean_nll > MAX_MEAN_NLL:
            raise TrainingDiverged(
                f"training diverged: the {split} loss is {mean_nll:g} at epoch "
                f"{self.current_epoch + 1} (lr {self.hparams.lr:g}); try a lower lr"
            )
        ppl = math.exp(mean_nll)
        self.log(SPLIT_METRIC[split], ppl, prog_bar=True)
        return ppl

    # --- training ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self._resumed_rng is not None:
            # Applied here, not at load time: the sanity check and loader set-up that precede
            # a resumed epoch draw from the RNG, which the uninterrupted run never did.
            _set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        self._start_epoch(seeded=False)
        if self._distillation is not None:
            self._distillation.start_epoch(self.device)
        # The lr this epoch trains with (the plateau step after validation changes it).
        self._epoch_lr = self.optimizers().param_groups[0]["lr"]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits = self._window_loss(batch)  # train_ppl stays the plain cross-entropy
        self.log("train_loss", loss, prog_bar=True)
        if self._distillation is None:
            return loss
        weight = self.hparams.distill_weight
        return (1 - weight) * loss + weight * self._distillation.loss(batch[0], logits)

    def on_train_epoch_end(self) -> None:
        self._log_perplexity("train")
        self.log("lr", self._epoch_lr)

    # --- evaluation: state and accumulators kept apart from training's ----------------
    def on_validation_epoch_start(self) -> None:
        # Validation runs before on_train_epoch_end: keep training's accumulators aside.
        self._train_snapshot = (self._state, self._nll_sum, self._token_count)
        self._start_epoch(seeded=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._window_loss(batch)

    def on_validation_epoch_end(self) -> None:
        val_ppl = self._log_perplexity("val")
        fitting = self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking
        if fitting and not self._averaging():
            step_lr_schedule(self.lr_schedule, val_ppl)
        self._state, self._nll_sum, self._token_count = self._train_snapshot

    def on_test_epoch_start(self) -> None:
        self._start_epoch(seeded=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._window_loss(batch)

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    # --- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        # Stepped by this module right after validation, not by Lightning after the epoch: an
        # end-of-epoch checkpoint must already hold that epoch's step to resume exactly.
        self.lr_schedule = lr_schedule(optimizer, self.hparams)
        if self._resumed_schedule is not None:
            self.lr_schedule.load_state_dict(self._resumed_schedule)
            self._resumed_schedule = None
        return optimizer

    # --- exact resume -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hitnet_rng"] = _get_rng_state()
        checkpoint["hitnet_lr_schedule"] = self.lr_schedule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Both are applied later: the optimizer does not exist yet, and see
        # on_train_epoch_start.
        self._resumed_rng = checkpoint.get("hitnet_rng")
        self._resumed_schedule = checkpoint.get("hitnet_lr_schedule")


LRSchedule = torch.optim.lr_scheduler.LRScheduler | ReduceLROnPlateau


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


class Distillation:
    """A frozen teacher run alongside training, its state carried across windows as the
    student's is; gives the soft-target term of the loss."""

    def __init__(self, teacher: RNNLanguageModel, temperature: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = temperature
        self._state: RecurrentState | None = None

    def start_epoch(self, device: torch.device) -> None:
        self.teacher.to(device)
        self._state = None

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """The teacher's logits for this window (its state carried from the last one)."""
        with torch.no_grad():
            if self._state is None:
                self._state = self.teacher.initial_state(inputs.size(1), inputs.device)
            logits, self._state = self.teacher(inputs, self._state)
        return logits

    def loss(self, inputs: Tensor, student_logits: Tensor) -> Tensor:
        """T^2 * KL(teacher || student) per token, on softmaxes at temperature T."""
        vocab = student_logits.size(-1)
        return soft_target_loss(
            student_logits.reshape(-1, vocab),
            self.teacher_logits(inputs).reshape(-1, vocab),
            self.temperature,
        )


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) per token, on softmaxes at temperature T.

    ``teacher_logits`` (tokens, vocab); ``student_logits`` (..., tokens, vocab): leading
    dimensions are stacked runs, each given its own loss against the one teacher.
    """
    t = temperature
    student = F.log_softmax(student_logits / t, dim=-1)
    teacher = F.log_softmax(teacher_logits / t, dim=-1).expand_as(student)
    divergence = F.kl_div(student, teacher, reduction="none", log_target=True)
    return divergence.sum((-2, -1)) / student.size(-2) * t * t


def _get_rng_state() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
