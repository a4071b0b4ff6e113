"""R runs of one model config trained as one Lightning job (``hitnet.stacked_model``).

``StackedRunsTask`` follows ``LanguageModelTask``'s recipe for each run: truncated BPTT with
the hidden state carried across windows, cross-entropy plus distillation from one shared
frozen teacher, gradient-norm clipping (per run), SGD with each run's own lr and lr schedule
(per run, stepped after validation), BTQ drawn from ``eval_seed`` in validation. Each run
draws its training noise from its own generator, seeded with its seed. Per-run metrics are
logged as ``<metric>/run<r>``; ``run_checkpoint(r)`` is run r as a single-run
``LanguageModelTask`` checkpoint, which the report and export read unchanged.

Optimisation is manual: Lightning's ``gradient_clip_val`` would clip one norm over all runs
(leave it unset: the task clips each run itself, ``clip``). Not covered yet: averaged SGD,
the activation warm-up, exact resume of the lr schedules, and stopping one diverged run.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor

from hitnet.constraints import PositiveFloat, checked_arguments
from hitnet.language_model import ModelConfig, RNNLanguageModel, detach_state
from hitnet.lightning_module import (
    MAX_MEAN_NLL,
    Distillation,
    LanguageModelTask,
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

# LanguageModelTask's parts that stacked runs do not have yet
NOT_COVERED = ("average_from_epoch", "activation_warmup_steps")


class StackedRunsTask(pl.LightningModule):
    """Trains ``len(seeds)`` runs of ``model`` at once; ``lrs``: one lr per run (or one for all)."""

    @checked_arguments
    def __init__(
        self,
        model: ModelConfig | dict[str, Any],
        seeds: list[int],
        lrs: list[float] | float = 20.0,
        clip: PositiveFloat = 0.25,
        **recipe: Any,
    ) -> None:
        """``recipe``: ``LanguageModelTask``'s arguments, as declared there (lr schedule,
        ``eval_seed``, distillation), but those this task does not cover yet."""
        super().__init__()
        self.automatic_optimization = False
        config = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        lrs = [float(lrs)] * len(seeds) if isinstance(lrs, int | float) else list(lrs)
        if not seeds or len(lrs) != len(seeds):
            raise ValueError(f"need one lr per seed; got {len(lrs)} lrs for seeds {seeds}")
        uncovered = sorted(recipe.keys() & NOT_COVERED)
        if uncovered:
            raise ValueError(f"stacked runs do not cover {', '.join(uncovered)} yet")
        # a single-run task checks the settings and gives the checkpoint format of each run
        single = LanguageModelTask(config, lr=lrs[0], **recipe)
        shared = {
            name: value
            for name, value in single.hparams.items()
            if name not in ("model", "lr", *NOT_COVERED)
        }
        self.save_hyperparameters(
            {"model": config.to_dict(), "seeds": list(seeds), "lrs": lrs, "clip": clip, **shared}
        )
        self._single_hparams = [{**single.hparams, "lr": lr} for lr in lrs]
        self.model = StackedLanguageModel([_seeded_model(config, seed) for seed in seeds])
        self._state: StackedState | None = None
        self._generators: list[torch.Generator] | None = None
        self._nll_sum: Tensor | None = None
        self._token_count = 0
        self._distillation: Distillation | None = None

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

    def run_checkpoint(self, run: int) -> dict[str, Any]:
        """Run ``run`` as a ``LanguageModelTask`` checkpoint (``load_from_checkpoint`` reads it)."""
        hparams = {**self._single_hparams[run], "lr": float(self._rates()[run])}
        single = LanguageModelTask(**hparams)
        single.model.load_state_dict(self.model.run_state_dict(run))
        return {
            "state_dict": single.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": pl.__version__,
            "epoch": self.current_epoch,
            "global_step": self.global_step,
        }

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

    def _log_perplexities(self, split: str) -> list[float]:
        """Each run's perplexity (inf for a run whose loss diverged)."""
        mean_nll = (self._nll_sum / max(self._token_count, 1)).tolist()
        ppls = [math.exp(nll) if nll <= MAX_MEAN_NLL else math.inf for nll in mean_nll]
        for run, ppl in enumerate(ppls):
            self.log(f"{split}_ppl/run{run}", ppl)
        return ppls

    # --- training ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if self._generators is None:  # once per fit: each run's noise goes on across epochs
            self._generators = [
                torch.Generator(device=self.device).manual_seed(seed) for seed in self.hparams.seeds
            ]
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

    def on_train_epoch_end(self) -> None:
        self._log_perplexities("train")
        for run, lr in enumerate(self._epoch_rates):
            self.log(f"lr/run{run}", lr)

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
        if fitting:
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
            lr_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr), hparams)
            for lr, hparams in zip(self.hparams.lrs, self._single_hparams, strict=True)
        ]
        self._optimizer = StackedSGD(self.model.parameters(), lr=lrs)
        return self._optimizer

    def _rates(self) -> Tensor:
        """Each run's current lr, (R,): the stacked optimizer's, changed in place."""
        return self._optimizer.param_groups[0]["lr"]


def _seeded_model(config: ModelConfig, seed: int) -> RNNLanguageModel:
    torch.manual_seed(seed)  # as a single run seeds itself before building its model
    return RNNLanguageModel(config)
