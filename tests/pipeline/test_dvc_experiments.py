"""DVC experiments keep what a user compares: the metrics and plots are in git (an
experiment's commit holds them), `dvc exp run --temp` finds the corpus and the MLflow store
of the workspace, and `dvc push` works without setup."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from pipeline.quick import project_files
from tests.conftest import PTB_DIR, REPO_ROOT
from tests.pipeline.conftest import (
    commit_stand_in_outputs,
    make_smoke_project,
    run_tool,
    tool_env,
    write_params,
)


def _git_ignores(path: str) -> bool:
    checked = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO_ROOT)
    return checked.returncode == 0


def test_git_keeps_every_metric_and_plot_and_ignores_the_cached_outputs():
    with Repo(str(REPO_ROOT)) as repo:
        outs = [out for stage in repo.index.stages for out in stage.outs]
    compared = [str(out.def_path) for out in outs if out.metric or out.plot]
    assert "runs/fp/lstm/history.csv" in compared and "runs/tune/gru/best.json" in compared
    assert [path for path in compared if _git_ignores(path)] == []
    cached = [str(out.def_path) for out in outs if out.use_cache]
    assert "runs/fp/lstm/model.ckpt" in cached
    assert [path for path in cached if not _git_ignores(path)] == []


def test_dvc_push_works_with_the_default_local_remote(tmp_path: Path):
    project = commit_stand_in_outputs(make_smoke_project(tmp_path / "project"))
    pushed = run_tool(project, "dvc", "push")
    assert "pushed" in pushed.stdout
    storage = tmp_path / "hitnet-dvc-storage"  # beside the project
    assert len([path for path in storage.rglob("*") if path.is_file()]) >= 2


def _experiment_metrics(shown: list[dict], name: str) -> dict:
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev["name"] == name:
                    return rev["data"]["metrics"]
    raise AssertionError(f"no experiment {name} in `dvc exp show`")


@pytest.mark.slow
def test_an_experiment_in_a_temporary_copy_finds_the_corpus_and_keeps_its_runs(tmp_path: Path):
    """`dvc exp run --temp` runs the stages in .dvc/tmp/exps/...: a relative data.source and
    the default MLflow store are found from the workspace all the same, and `dvc exp show`
    lists the experiment's metrics."""
    (tmp_path / "ptb").symlink_to(PTB_DIR.resolve())
    project = make_smoke_project(tmp_path / "project")
    write_params(project, {"data": {"source": "../ptb"}})  # beside the project
    run_tool(project, "git", "commit", "-qam", "the corpus beside the project")
    env = {key: value for key, value in tool_env(project).items() if key != "MLFLOW_TRACKING_URI"}
    ran = subprocess.run(
        ["dvc", "exp", "run", "--temp", "--name", "tmp-fp", "train_fp@lstm"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    shown = json.loads(run_tool(project, "dvc", "exp", "show", "--json").stdout)
    metrics = _experiment_metrics(shown, "tmp-fp")["runs/fp/lstm/metrics.json"]["data"]
    assert metrics["val_ppl"] > 1 and metrics["epochs"] == 2
    diff = json.loads(
        run_tool(project, "dvc", "metrics", "diff", "--json", "HEAD", "tmp-fp").stdout
    )
    assert diff["runs/fp/lstm/metrics.json"]["val_ppl"]["new"] == metrics["val_ppl"]
    run_tool(project, "dvc", "plots", "diff", "HEAD", "tmp-fp", "-o", str(tmp_path / "plots"))
    assert "runs/fp/lstm/history.csv" in (tmp_path / "plots" / "index.html").read_text()
    # the stages' MLflow runs are in the workspace's store, their artifacts beside it
    with sqlite3.connect(project / "mlflow.db") as store:
        artifact_uris = [uri for (uri,) in store.execute("SELECT artifact_uri FROM runs")]
    assert len(artifact_uris) == 2  # prepare, train_fp@lstm
    assert all(uri.startswith((project / "mlruns").as_uri()) for uri in artifact_uris)
    assert not [name for name in os.listdir(project) if name.startswith("tmp")]


def _committed_lock() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())


def test_the_committed_lock_is_a_full_size_run_and_records_the_committed_files():
    """dvc.lock is the full-size run's (results/h200/repro.md): the metrics, histories and
    sweep records in git are the very files it recorded, so `dvc status` calls them current."""
    stages = _committed_lock()["stages"]
    assert {"prepare", "train_fp@lstm", "train_fp@gru", "tune@lstm", "tune@gru"} <= set(stages)
    for name, stage in stages.items():
        if name.startswith(("train_fp@", "tune@")):
            recorded = stage["params"]["params.yaml"]
            assert recorded["data.max_tokens"] is None and recorded["model"]["hidden_size"] == 300
    assert stages["tune@lstm"]["params"]["params.yaml"]["tune.num_samples"] == 16
    in_git = [
        out for stage in stages.values() for out in stage["outs"] if not _git_ignores(out["path"])
    ]
    assert len(in_git) == 10  # per cell: FP metrics + history, best.json, trials.csv, sweep.png
    for out in in_git:
        digest = hashlib.md5((REPO_ROOT / out["path"]).read_bytes()).hexdigest()
        assert digest == out["md5"], f"{out['path']} is not the file dvc.lock recorded"


def test_dvc_exp_show_on_the_committed_lock_shows_what_each_sweep_chose():
    shown = json.loads(run_tool(REPO_ROOT, "dvc", "exp", "show", "--json").stdout)
    head = next(rev for rev in shown if rev["rev"] != "workspace")
    for cell in ("lstm", "gru"):
        path = f"runs/tune/{cell}/best.json"
        best = json.loads((REPO_ROOT / path).read_text())
        assert head["data"]["metrics"][path]["data"] == best
        assert best["val_ppl"] <= best["configured_val_ppl"] and best["lr"] > 0


def test_a_quick_or_smoke_copy_leaves_the_committed_runs_records_behind():
    """A copy is an experiment of its own: it starts with no lock and no records."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "dvc.lock" in tracked and "runs/tune/lstm/best.json" in tracked
    copied = project_files(REPO_ROOT)
    assert "params.yaml" in copied
    assert [name for name in copied if name == "dvc.lock" or name.startswith("runs/")] == []
