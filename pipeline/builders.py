"""What every stage builds the same way: the data, the model and its task, the link of a ternary
model to its FP model, the compiled recurrence, the Trainer, and where models and resume
folders live. One module, so that no stage imports another.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, TQDMProgressBar

from hitnet.data import PTBDataModule
from hitnet.language_model import CellType
from hitnet.lightning_module import LanguageModelTask
from pipeline.checkpoint_io import AtomicCheckpointIO
from pipeline.params import HardwareParams, Params, ParamsError, TrainParams

Kind = Literal["fp", "ternary"]


def model_dir(
    kind: Kind, cell: CellType, seed: int | None = None, runs: Path = Path("runs")
) -> Path:
    """Where a stage writes its model: ``runs/fp/lstm``, or ``runs/ternary/lstm/seed1``."""
    return Path(runs) / kind / cell / ("" if seed is None else f"seed{seed}")


def fingerprint(params: dict, init_from: Path | None) -> str:
    """Names the resume folder: a change of params or of the FP model starts afresh."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    if init_from is not None:
        digest.update(Path(init_from).read_bytes())
    return digest.hexdigest()[:12]


def datamodule_for(params: Params, data_dir: Path) -> PTBDataModule:
    data = params.data
    return PTBDataModule(
        data_dir,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        bptt=data.bptt,
        allow_unknown=data.allow_unknown,
        max_tokens=data.max_tokens,
    )


def build_task(params: Params, cell: CellType, kind: Kind, vocab_size: int) -> LanguageModelTask:
    """The task with the recipe's values for every argument of ``LanguageModelTask`` it has."""
    recipe = params.recipe(kind, cell)
    arguments = set(inspect.signature(LanguageModelTask).parameters) & set(
        type(recipe).model_fields
    )
    return LanguageModelTask(
        params.build_model_config(cell, vocab_size, ternary=kind == "ternary"),
        eval_seed=params.seed,
        **recipe.model_dump(include=arguments),
    )


def start_from_fp(task: LanguageModelTask, fp_checkpoint: Path, load_weights: bool) -> None:
    """A ternary model's link to its FP model: the initial weights (unless resuming) and,
    when the recipe distils, the teacher: the same architecture, full precision."""
    state = torch.load(fp_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    if load_weights:  # same parameter layout: FP weights load unchanged
        try:
            task.load_state_dict(state)
        except RuntimeError as error:  # another cell, or other sizes
            mismatch = str(error).splitlines()[-1].strip()
            raise ParamsError(
                f"--init {fp_checkpoint} is not this stage's FP model (a {task.model.config.cell}"
                f" of params.yaml's sizes): {mismatch}"
            ) from None
    if task.hparams.distill_weight > 0:
        teacher = LanguageModelTask(task.model.config.full_precision())
        teacher.load_state_dict(state)
        task.set_teacher(teacher.model)


def compile_as_configured(task: LanguageModelTask, hardware: HardwareParams) -> None:
    """The recurrence compiled as `hardware.compile` says, in every stage that runs a model:
    rounded BTQ then meets the same float32 arithmetic in training, sweeps and the report."""
    if not task.model.recurrent.uses_fused_kernel:  # cuDNN needs no compiling
        task.model.recurrent.compile_recurrence(hardware.compile_mode())


def build_trainer(
    params: Params, recipe: TrainParams, work_dir: Path, callbacks: list
) -> pl.Trainer:
    on_terminal = sys.stderr.isatty()  # a live bar for people; CI gets one line an epoch
    return pl.Trainer(
        max_epochs=recipe.epochs,
        gradient_clip_val=recipe.clip,
        **params.hardware.trainer_kwargs(),
        limit_train_batches=recipe.limit_train_batches,
        limit_val_batches=recipe.limit_eval_batches,
        limit_test_batches=recipe.limit_eval_batches,
        callbacks=callbacks + ([TQDMProgressBar(refresh_rate=50)] if on_terminal else []),
        enable_progress_bar=on_terminal,
        # a stage checkpoints as it says (ModelCheckpoint, Ray's report) or not at all: no
        # default ModelCheckpoint writing files nobody reads
        enable_checkpointing=any(isinstance(callback, Checkpoint) for callback in callbacks),
        logger=False,
        default_root_dir=work_dir,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )


def evaluation_trainer(params: Params, limit_batches: int | None) -> pl.Trainer:
    """A Trainer that only tests (a model's test perplexity), on params' hardware."""
    return pl.Trainer(
        **params.hardware.trainer_kwargs(),
        limit_test_batches=limit_batches,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
