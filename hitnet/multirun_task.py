"""R runs of one model config trained as one Lightning job (``hitnet.stacked_model``).

``StackedRunsTask`` follows ``LanguageModelTask``'s recipe for each run, and takes that recipe
as ``LanguageModelTask`` takes it (its keyword arguments, checked by a single-run task built
inside): truncated BPTT with the hidden state carried across windows, cross-entropy plus
distillation from one shared frozen teacher, gradient-norm clipping (per run), SGD with each
run's own lr and lr schedule (stepped after validation), BTQ drawn from ``eval_seed`` in
validation, and the parts the single task brings along as callbacks: averaged SGD from
``average_from_epoch`` (the mean of stacked weights, elementwise, is each run's mean) and the
activation warm-up. Each run draws its training noise from its own generator, seeded with its
seed. Per-run metrics are logged as ``<metric>/run<r>``; ``single_run_checkpoint`` makes run r
of a saved job (``run_checkpoint(r)``: of the task in hand) a single-run ``LanguageModelTask``
checkpoint, which the report and export read unchanged.

Optimisation is manual: Lightning's ``gradient_clip_val`` would clip one norm over all runs
(leave it unset: the task clips each run itself, ``clip``). A fit resumed from a checkpoint
goes on exactly: checkpoints hold each run's generator state and lr schedule. A run whose loss
diverges stops the job (``TrainingDiverged``, naming its seed), as it would stop its own
single-run job: its seeds are one recipe's, and a recipe that diverges for one is not kept.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from hitnet.averaging import AveragedSGD
from hitnet.constraints import PositiveFloat, checked_arguments
from hitnet.language_model import ModelConfig, RNNLanguageModel, detach_state
from hitnet.lightning_module import (
    MAX_MEAN_NLL,
    Distillation,
    LanguageModelTask,
    TrainingDiverged,
    lr_schedule,
    step_lr_schedule,
)
from hitnet.multirun import (
    StackedSGD,
    clip_grad_norm_per_run_,
    per_run_cross_entropy,
    per_run_training_loss,
)
from hitnet.stacked_model import StackedLanguageModel, StackedState
from hitnet.warmup import ActivationWarmup


class StackedRunsTask(pl.LightningModule):
    """Trains ``len(seeds)`` runs of ``model`` at once.

    ``recipe``: ``LanguageModelTask``'s keyword arguments, the same for every run; ``lrs``
    (one per run) replaces its ``lr`` where runs differ in lr.
    """

    @checked_arguments
    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        seeds: list[int],
        lrs: list[float] | None = None,
        clip: PositiveFloat = 0.25,
        **recipe: Any,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        config = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        if not seeds or (lrs is not None and len(lrs) != len(seeds)):
            raise ValueError(f"need seeds and one lr per seed; got lrs {lrs} for seeds {seeds}")
        if lrs is not None:
            if "lr" in recipe:
                raise ValueError("give one lr for all runs (lr) or one per run (lrs), not both")
            recipe["lr"] = min(lrs)  # the single task's check of it then covers every run's
        # A single-run task checks the recipe and builds its callbacks.
        single = LanguageModelTask(config, **recipe)
        lrs = [single.hparams.lr] * len(seeds) if lrs is None else [float(lr) for lr in lrs]
        recipe = {k: v for k, v in single.hparams.items() if k not in ("model", "lr")}
        self.save_hyperparameters(
            {"model": config.to_dict(), "seeds": list(seeds), "lrs": lrs, "clip": clip, **recipe}
        )
        # Its averaging and warm-up act on any module's weights and noise; its lr and RNG
        # parts are a single run's (this task keeps one lr schedule and generator per run).
        self._parts: list[Callback] = [
            part
            for part in single.configure_callbacks()
            if isinstance(part, AveragedSGD | ActivationWarmup)
        ]
        self.model = StackedLanguageModel([_seeded_model(config, seed) for seed in seeds])
        self._state: StackedState | None = None
        self._generators: list[torch.Generator] | None = None
        self._nll_sum: Tensor | None = None
        self._token_count = 0
        self._distillation: Distillation | None = None
        self._resumed_generators: list[Tensor] | None = None
        self._resumed_schedules: list[dict[str, Any]] | None = None

    def load_initial_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Every run starts from one single-run model's weights (the FP model of a stage)."""
        runs = self.model.runs
        stacked = {name: value.expand(runs, *value.shape) for name, value in state_dict.items()}
        self.model.load_state_dict(stacked)

    def set_teacher(self, teacher: RNNLanguageModel) -> None:
        """One frozen teacher for every run (see ``LanguageModelTask.set_teacher``)."""
        if self.hparams.distill_weight == 0:
            raise ValueError("set_teacher needs distill_weight > 0")
        self._distillation = Distillation(teacher, self.hparams.distill_temperature)

    def configure_callbacks(self) -> list[Callback]:
        return self._parts

    def run_checkpoint(self, run: int) -> dict[str, Any]:
        """Run ``run`` as a ``LanguageModelTask`` checkpoint of the module's weights as they are
        (after an averaged fit, the mean); see ``single_run_checkpoint``."""
        checkpoint = {
            "state_dict": self.state_dict(),
            "hyper_parameters": dict(self.hparams),
            "epoch": self.current_epoch,
            "global_step": self.global_step,
        }
        return single_run_checkpoint(checkpoint, run)

    def _averaging(self) -> bool:
        """True from the epoch averaged SGD starts: the lrs then stay where they are."""
        start = self.hparams.average_from_epoch
        return start is not None and self.current_epoch + 1 >= start

    # --- shared by train / val -------------------------------------------------------
    def _start_epoch(self) -> None:
        self._state = None
        self._nll_sum = torch.zeros(self.model.runs, device=self.device)
        self._token_count = 0

    def _forward(self, inputs: Tensor, generators: list[torch.Generator]) -> Tensor:
        if self._state is None:
            self._state = self.model.initial_state(inputs.size(1), self.device)
        logits, state = self.model(inputs, self._state, generators)
        self._state = detach_state(state)
        return logits

    def _log_perplexities(self, split: str, **log_options: Any) -> list[float]:
        """Logs each run's perplexity; raises ``TrainingDiverged`` naming the runs whose loss
        is NaN or overflows, before anything (a checkpoint, a metric) records it."""
        mean_nll = (self._nll_sum / max(self._token_count, 1)).tolist()
        seeds, lrs = self.hparams.seeds, self.hparams.lrs
        diverged = [
            f"run {run} (seed {seeds[run]}, lr {lrs[run]:g}) has {nll:g}"
            for run, nll in enumerate(mean_nll)
            if not math.isfinite(nll) or nll > MAX_MEAN_NLL
        ]
        if diverged:
            raise TrainingDiverged(
                f"training diverged at epoch {self.current_epoch + 1}: of the {split} loss, "
                f"{'; '.join(diverged)}; try a lower lr"
            )
        ppls = [math.exp(nll) for nll in mean_nll]
        for run, ppl in enumerate(ppls):
            self.log(f"{split}_ppl/run{run}", ppl, **log_options)
        return ppls

    # --- training ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self._generators is None:  # once per fit: each run's noise goes on across epochs
            self._generators = [
                torch.Generator(device=self.device).manual_seed(seed) for seed in self.hparams.seeds
            ]
        if self._resumed_generators is not None:
            for generator, state in zip(self._generators, self._resumed_generators, strict=True):
                generator.set_state(state)
            self._resumed_generators = None
        self._start_epoch()
        if self._distillation is not None:
            self._distillation.start_epoch(self.device)
        self._epoch_rates = self._rates().tolist()  # what this epoch trains with

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self._forward(inputs, self._generators)
        weight = self.hparams.distill_weight
        loss, cross_entropy = per_run_training_loss(
            logits, inputs, targets, self._distillation, weight
        )
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss.sum())
        clip_grad_norm_per_run_(self.model.parameters(), self.hparams.clip)
        optimizer.step()
        self._nll_sum += cross_entropy.detach() * targets.numel()
        self._token_count += targets.numel()
        if self.trainer.is_last_batch:  # as LanguageModelTask: callbacks see them at epoch end
            once = {"on_step": False, "on_epoch": True, "batch_size": 1}
            self._log_perplexities("train", **once)
            for run, lr in enumerate(self._epoch_rates):
                self.log(f"lr/run{run}", lr, **once)

    # --- validation ---------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._train_snapshot = (self._state, self._nll_sum, self._token_count)
        self._start_epoch()
        seed = self.hparams.eval_seed
        self._eval_generators = [
            torch.Generator(device=self.device).manual_seed(seed) for _ in self.hparams.seeds
        ]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self._forward(inputs, self._eval_generators)
        self._nll_sum += per_run_cross_entropy(logits, targets) * targets.numel()
        self._token_count += targets.numel()

    def on_validation_epoch_end(self) -> None:
        ppls = self._log_perplexities("val")
        fitting = self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking
        if fitting and not self._averaging():
            rates = self._rates()
            for run, (schedule, ppl) in enumerate(zip(self._schedules, ppls, strict=True)):
                schedule.optimizer.step()  # no gradient, no change: the schedule's order check
                step_lr_schedule(schedule, ppl)
                rates[run] = schedule.optimizer.param_groups[0]["lr"]
        self._state, self._nll_sum, self._token_count = self._train_snapshot

    # --- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        lrs = torch.tensor(self.hparams.lrs, device=self.device)
        # torch's schedules step an optimizer's lr: each run's on a proxy optimizer holding
        # that run's lr alone, copied into the stacked lr after every step.
        self._schedules = [
            lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr), self.hparams)
            for lr in self.hparams.lrs
        ]
        if self._resumed_schedules is not None:  # the stacked lrs come with the optimizer
            for schedule, state in zip(self._schedules, self._resumed_schedules, strict=True):
                schedule.optimizer.load_state_dict(state["optimizer"])
                schedule.load_state_dict(state["schedule"])
            self._resumed_schedules = None
        self._optimizer = StackedSGD(self.model.parameters(), lr=lrs)
        return self._optimizer

    def _rates(self) -> Tensor:
        """Each run's current lr, (R,): the stacked optimizer's, changed in place."""
        return self._optimizer.param_groups[0]["lr"]

    # --- exact resume -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._generators is not None:  # made as training starts
            checkpoint["hitnet_run_generators"] = [g.get_state() for g in self._generators]
        checkpoint["hitnet_run_lr_schedules"] = [
            {"optimizer": s.optimizer.state_dict(), "schedule": s.state_dict()}
            for s in self._schedules
        ]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied later: the optimizer does not exist yet, and the generators are made (and
        # so restored) as training starts.
        self._resumed_generators = checkpoint.get("hitnet_run_generators")
        self._resumed_schedules = checkpoint.get("hitnet_run_lr_schedules")


def single_run_checkpoint(stacked: dict[str, Any], run: int) -> dict[str, Any]:
    """Run ``run`` of a ``StackedRunsTask`` checkpoint as its own ``LanguageModelTask`` job
    would have saved it (``load_from_checkpoint``, the report and export read it): its weights
    (with averaged SGD, the mean, which a checkpoint's state_dict holds) and its hyperparameters.
    The job's training state (optimizer, generators, the training weights beside the mean) is
    left out: a run's checkpoint is for testing and export, not for resuming."""
    stacked_hparams = stacked["hyper_parameters"]
    hparams = {k: v for k, v in stacked_hparams.items() if k not in ("seeds", "lrs", "clip")}
    single = LanguageModelTask(**hparams, lr=stacked_hparams["lrs"][run])
    single.load_state_dict({name: value[run] for name, value in stacked["state_dict"].items()})
    return {
        "state_dict": single.state_dict(),
        "hyper_parameters": dict(single.hparams),
        "pytorch-lightning_version": pl.__version__,
        "epoch": stacked["epoch"],
        "global_step": stacked["global_step"],
    }


def _seeded_model(config: ModelConfig, seed: int) -> RNNLanguageModel:
    torch.manual_seed(seed)  # as a single run seeds itself before building its model
    return RNNLanguageModel(config)
