"""A throwaway copy of the project, as a git + DVC repo with a smoke params.yaml."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PTB_DIR, REPO_ROOT

# Every stage of dvc.yaml, as its MLflow runs are tagged.
STAGES = [
    "prepare",
    "train_fp@lstm",
    "train_fp@gru",
    "tune@lstm",
    "tune@gru",
    "train_ternary@lstm",
    "train_ternary@gru",
    "report",
]

# What a smoke run changes in params.yaml: a tiny model on a slice of PTB, 2 epochs, CPU.
SMOKE = {
    "data": {"source": str(PTB_DIR), "max_tokens": 20_000},
    "model": {"embedding_size": 16, "hidden_size": 16},
    "train_fp": {"epochs": 2, "limit_train_batches": 8, "limit_eval_batches": 4},
    "train_ternary": {
        "epochs": 2,
        "limit_train_batches": 8,
        "limit_eval_batches": 4,
        # the repo's GRU recipe sets its own epochs and start of averaging
        "per_cell": {"gru": {"epochs": 2, "average_from_epoch": 2}},
    },
    "hardware": {"accelerator": "cpu"},
    "report": {"eval_seeds": [0, 1, 2]},
    "tune": {
        "num_samples": 2,
        "epochs": 2,
        "max_concurrent": 2,
        "limit_train_batches": 4,
        "limit_eval_batches": 2,
        "fail_at_epoch": 1,  # every trial fails once and is retried from its checkpoint
    },
}


def deep_update(base: dict, changes: dict) -> dict:
    """A copy of ``base`` with ``changes`` merged in, section by section."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = deep_update(yaml.safe_load(path.read_text()), changes)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in listed.stdout.splitlines() if (REPO_ROOT / name).is_file()]


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
    """A copy of the tracked files at ``project``, committed to a new git repo, smoke params."""
    for name in tracked_files():
        target = project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    write_params(project, SMOKE)
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    for command in (
        ["git", "init", "-q"],
        ["git", *identity, "add", "-A"],
        ["git", *identity, "commit", "-qm", "smoke"],
    ):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    return project


@pytest.fixture
def smoke_project(tmp_path: Path) -> Path:
    return make_smoke_project(tmp_path / "project")
