"""A throwaway copy of the project, as a git + DVC repo with a smoke params.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params
from pipeline.quick import QUICK_CHANGES, deep_update, make_project
from tests.conftest import PTB_DIR

# The smoke run's training seeds: one ternary stage per cell and seed.
SMOKE_SEEDS = [0, 1]

# Every stage of dvc.yaml at smoke params, as its MLflow runs are tagged.
STAGES = [
    "prepare",
    "train_fp@lstm",
    "train_fp@gru",
    "tune@lstm",
    "tune@gru",
    *[f"train_ternary@{cell}-{seed}" for cell in ("lstm", "gru") for seed in SMOKE_SEEDS],
    "study@lstm",
    "study@gru",
    "report",
    "export@lstm",
    "export@gru",
]

# What a smoke run changes in params.yaml: the quick look's changes (a tiny model on a slice
# of PTB, 2 epochs, CPU), two training seeds, and every sweep trial failing once.
SMOKE = deep_update(
    yaml.safe_load(QUICK_CHANGES.read_text()),
    {
        "training_seeds": SMOKE_SEEDS,
        "data": {"source": str(PTB_DIR)},
        "tune": {"fail_at_epoch": 1},  # every trial fails once and is retried from its checkpoint
    },
)


def write_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = deep_update(yaml.safe_load(path.read_text()), changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tool_env(project: Path) -> dict[str, str]:
    """The venv's tools on PATH, MLflow in the project's own SQLite file, no terminal."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run_tool(project: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=project, env=tool_env(project), capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def make_smoke_project(project: Path) -> Path:
    """A copy of the project at ``project``, committed to a new git repo, smoke params."""
    project.mkdir(parents=True, exist_ok=True)
    return make_project(project, SMOKE)


def commit_stand_in_outputs(project: Path) -> Path:
    """Every stage's outputs as small stand-in files, recorded in dvc.lock by ``dvc commit``:
    a lock as a repro writes it (deps, params), in seconds."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        outs = [project / str(out.def_path) for stage in repo.index.stages for out in stage.outs]
    for path in outs:
        folder = path if not path.suffix else path.parent  # data/ptb: a folder
        folder.mkdir(parents=True, exist_ok=True)
        (path if path.suffix else path / "stand-in").write_text("stand-in\n")
    run_tool(project, "dvc", "commit", "--force")
    return project


@pytest.fixture
def smoke_project(tmp_path: Path) -> Path:
    return make_smoke_project(tmp_path / "project")


@pytest.fixture
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def save_briefly_trained(
    params: Params, cell: str, kind: str, ptb_dir: Path, path: Path, seed: int = 0, steps: int = 4
) -> Path:
    """A tiny model after a few steps, saved as a checkpoint (tests need its format, not its
    quality)."""
    import pytorch_lightning as pl

    from pipeline.builders import build_task, datamodule_for

    datamodule = datamodule_for(params, ptb_dir)
    pl.seed_everything(seed)
    task = build_task(params, cell, kind, datamodule.vocab_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path
