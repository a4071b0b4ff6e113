"""End to end: `dvc repro` of the whole pipeline on a smoke configuration, real DVC + MLflow."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hitnet.analysis import STUDIED_QUANTIZERS as QUANTIZERS
from tests.pipeline.conftest import SMOKE, SMOKE_SEEDS, STAGES, run_tool, tool_env

TRAINING = [stage for stage in STAGES if stage.startswith("train")]


def _runs_by_stage(project: Path) -> dict[str, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hitnet-ptb")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        runs.setdefault(run.data.tags["dvc.stage"], []).append(run)
    return runs


@pytest.mark.slow
def test_make_repros_driver_runs_every_stage_records_everything_and_dvc_then_has_nothing_to_do(
    smoke_project,
):
    project = smoke_project
    driver = run_tool(project, sys.executable, "-m", "pipeline.repro", "--jobs", "3")
    for chatter in ("GPU available", "Tip:", "does not have many workers"):
        assert chatter not in driver.stdout + driver.stderr  # the libraries' noise stays out
    # sweeps show their trials' epochs, and why an attempt failed (each fails once here)
    assert re.search(r"\[tune@lstm\] tune@lstm trial \w+ epoch 2/2  train_ppl", driver.stdout)
    assert "failed: RuntimeError: injected failure after epoch 1" in driver.stdout
    # the two FP models trained at once: the second started before the first ended
    lines = driver.stdout.splitlines()
    assert lines.index("repro: starting train_fp@gru") < min(
        index for index, line in enumerate(lines) if line.startswith("repro: train_fp@lstm done")
    )
    timing = json.loads((project / "runs" / "timing.json").read_text())
    assert set(timing) == {*STAGES, "total"} and timing["total"] >= max(timing[s] for s in STAGES)
    log = (project / "runs" / "repro.log").read_text().splitlines()
    assert [line for line in log if line.startswith("repro: ")] == [
        line for line in lines[:-1] if line.startswith("repro: ")
    ]

    lock = (project / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"{stage}:" in lock

    shown = json.loads(run_tool(project, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    model_dirs = [f"runs/fp/{cell}" for cell in ("lstm", "gru")]
    model_dirs += [f"runs/ternary/{c}/seed{s}" for c in ("lstm", "gru") for s in SMOKE_SEEDS]
    for folder in model_dirs:
        values = metrics[f"{folder}/metrics.json"]["data"]
        for key in ("train_ppl", "val_ppl", "test_ppl"):
            assert math.isfinite(values[key]) and values[key] > 1, (folder, key)
        # a ternary model's figures name their BTQ evaluation (the smoke params round it)
        assert values.get("btq_eval") == ("rounded" if "ternary" in folder else None)
    for cell in ("lstm", "gru"):  # what each sweep chose is a metric too
        assert metrics[f"runs/tune/{cell}/best.json"]["data"]["winner"] in ("configured", "sweep")
    report_metrics = metrics["report/metrics.json"]["data"]
    for cell in ("lstm", "gru"):
        ternary = report_metrics[cell]["ternary"]
        assert sorted(ternary["seeds"]) == [str(seed) for seed in SMOKE_SEEDS]
        assert math.isfinite(ternary["mean"]) and math.isfinite(ternary["std"])

    for cell in ("lstm", "gru"):  # the exported file scores as the checkpoint it came from
        size = metrics[f"runs/export/{cell}/size.json"]["data"]
        assert size["seed"] in SMOKE_SEEDS and size["recurrent_weights_ratio"] > 15
        ppl = size["test_ppl_rounded"]
        assert ppl["file"] == ppl["checkpoint"]
        assert (
            size["file_bytes"]
            == (project / "runs" / "export" / cell / "model.hitnet").stat().st_size
        )

    report = (project / "report" / "README.md").read_text()
    assert "| LSTM |" in report and "| GRU |" in report and "110.3" in report
    assert (project / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    runs = _runs_by_stage(project)
    assert sorted(runs) == sorted(STAGES)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    for stage in TRAINING:
        (run,) = runs[stage]
        assert run.info.status == "FINISHED" and run.info.run_name == stage
        assert len(run.data.tags["git.commit"]) == 40
        history = client.get_metric_history(run.info.run_id, "val_ppl")
        assert [m.step for m in history] == [1, 2]
        assert math.isfinite(run.data.metrics["test_ppl"])
        assert "train_fp.lr" in run.data.params or "train_ternary.lr" in run.data.params
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "history.csv"} <= artifacts
        (dataset,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "ptb.train.txt"]
        assert len({t.key: t.value for t in dataset.tags}["sha256"]) == 64
    # every model registered, and `best` on the lowest validation PPW of each kind and cell
    for cell in ("lstm", "gru"):
        fp_versions = client.search_model_versions(f"name = 'hitnet-fp-{cell}'")
        assert len(fp_versions) == 1
        versions = client.search_model_versions(f"name = 'hitnet-ternary-{cell}'")
        assert sorted(v.tags["seed"] for v in versions) == [str(s) for s in SMOKE_SEEDS]
        best = client.get_model_version_by_alias(f"hitnet-ternary-{cell}", "best")
        val = {
            str(seed): json.loads(
                (project / "runs" / "ternary" / cell / f"seed{seed}" / "metrics.json").read_text()
            )["val_ppl"]
            for seed in SMOKE_SEEDS
        }
        assert best.tags["seed"] == min(val, key=val.get)
    for cell in ("lstm", "gru"):
        best = json.loads((project / "runs" / "tune" / cell / "best.json").read_text())
        searched = {"lambda_sigma", "lambda_tanh", "ttq_threshold", "lr", "dropout"}
        assert set(best) == searched | {"val_ppl", "winner", "configured_val_ppl"}
        assert best["winner"] in ("configured", "sweep")
        trials = (project / "runs" / "tune" / cell / "trials.csv").read_text().splitlines()
        assert len(trials) == 1 + 2  # header + num_samples
        (parent,) = [r for r in runs[f"tune@{cell}"] if "mlflow.parentRunId" not in r.data.tags]
        nested = [r for r in runs[f"tune@{cell}"] if r is not parent]
        assert len(nested) == 2
        for trial in nested:
            assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert set(trial.data.params) == searched
            steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_ppl")]
            assert steps and steps == list(range(1, len(steps) + 1))
        parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"best.json", "trials.csv", "sweep.png"} <= parent_artifacts
        # every seed's ternary model used the sweep's best values
        for seed in SMOKE_SEEDS:
            (ternary,) = runs[f"train_ternary@{cell}-{seed}"]
            assert float(ternary.data.params["quant.lambda_sigma"]) == best["lambda_sigma"]
            assert ternary.data.params["seed"] == str(seed)
    for cell in ("lstm", "gru"):  # the quantizer study: table, figures, one MLflow run
        study = metrics[f"study/{cell}/metrics.json"]["data"]
        assert set(study["table"]) == {
            *(f"{target}_{kind}" for target in ("weights", "activations") for kind in QUANTIZERS),
            "hybrid",
        }
        assert set(study["ablation"]) == {"lambda_1", "lambda_2"}  # quick.yaml's lambdas
        for result in [*study["table"].values(), *study["ablation"].values()]:
            assert all(math.isfinite(result[key]) for key in ("ptq_ppl", "qat_ppl"))
        assert set(study["mse"]) == {"W_ih", "W_hh", "gates", "candidate", "hidden"}
        table = (project / "study" / cell / "README.md").read_text()
        assert "| BTQ, activations only |" in table and f"{study['fp']['test_ppl']:.2f}" in table
        (study_run,) = runs[f"study@{cell}"]
        assert study_run.data.metrics["table.hybrid.qat_ppl"] == study["table"]["hybrid"]["qat_ppl"]
        artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id, "study")}
        figures = {"study/distributions.png", "study/ablation.png"}
        assert figures | {"study/README.md", "study/metrics.json"} <= artifacts
    (report_run,) = runs["report"]
    assert {a.path for a in client.list_artifacts(report_run.info.run_id, "report")} >= {
        "report/README.md",
        "report/curves.png",
    }

    run_count = sum(map(len, runs.values()))
    second = run_tool(project, "dvc", "repro")
    assert "Data and pipelines are up to date" in second.stdout
    assert sum(map(len, _runs_by_stage(project).values())) == run_count  # nothing ran

    run_tool(project, "dvc", "plots", "show", "-o", str(project / "plots"))
    page = (project / "plots" / "index.html").read_text()
    for cell in ("lstm", "gru"):  # each study figure is a DVC plot
        assert f"study/{cell}/distributions.png" in page and f"study/{cell}/ablation.png" in page


@pytest.mark.slow
def test_a_killed_training_stage_resumes_from_its_checkpoint(smoke_project):
    project = smoke_project
    from tests.pipeline.conftest import write_params

    write_params(project, {"train_fp": {"epochs": 4, "limit_train_batches": 60}})
    run_tool(project, "git", "commit", "-qam", "longer fp training")
    run_tool(project, "dvc", "repro", "prepare")
    # A finished run first: DVC's run cache then knows these deps, and must not restore
    # its outputs in place of resuming the killed rerun (fault: it did, and left the
    # checkpoints and a RUNNING MLflow run behind).
    run_tool(project, "dvc", "repro", "--single-item", "train_fp@lstm")

    history = project / "runs" / "fp" / "lstm" / "history.csv"
    history.unlink()
    stage = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", "train_fp@lstm"],
        cwd=project,
        env=tool_env(project),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (history.is_file() and len(history.read_text().splitlines()) >= 3):  # 2 epochs
        assert stage.poll() is None, "the stage ended before it could be killed"
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)
    os.killpg(stage.pid, signal.SIGKILL)  # power loss: no clean-up of any kind
    stage.wait()
    epochs_before_kill = len(history.read_text().splitlines()) - 1
    assert epochs_before_kill < 4

    rerun = run_tool(project, "dvc", "repro", "--single-item", "train_fp@lstm")
    assert "resuming from" in rerun.stdout
    assert f"epoch {epochs_before_kill + 1}/4" in rerun.stdout
    assert "epoch 1/4" not in rerun.stdout  # did not start over

    rows = history.read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4]
    # one run for the finished execution, one for the killed one, which went on when resumed
    _finished, run = sorted(
        _runs_by_stage(project)["train_fp@lstm"], key=lambda r: r.info.start_time
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")]
    assert sorted(steps) == [1, 2, 3, 4] and run.info.status == "FINISHED"
    assert not any((project / "checkpoints").iterdir())  # finished: resume state cleaned up


# Started by the stage's Python (a sitecustomize on PYTHONPATH runs before any module): a
# SIGKILL the moment the stage calls Trainer.<KILL_AT>, and in no other process. Polling the
# stage's files from outside could not hit these points every time; this hits them always.
KILL_HOOK = """
import os, signal, sys
if sys.orig_argv[1:3] == ["-m", "pipeline.train"] and os.environ.get("KILL_AT"):
    import pytorch_lightning as pl

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(pl.Trainer, os.environ["KILL_AT"], killed)
"""


@pytest.mark.slow
def test_a_stage_sigkilled_outside_its_epochs_finishes_on_a_plain_rerun_in_one_mlflow_run(
    smoke_project, tmp_path
):
    """Faults: a kill before the first checkpoint left a RUNNING MLflow run, and the rerun
    opened another; a kill after the last epoch (testing, exporting) left a run with no
    epoch to train, so the rerun, whose outs DVC deletes first, failed on history.csv."""
    project = smoke_project
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    env = tool_env(project)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    run_tool(project, "dvc", "repro", "prepare")
    out, epochs = project / "runs" / "fp" / "lstm", SMOKE["train_fp"]["epochs"]

    def repro(kill_at: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["dvc", "repro", "--single-item", "train_fp@lstm"],
            cwd=project,
            env={**env, "KILL_AT": kill_at or ""},
            capture_output=True,
            text=True,
        )

    killed = repro(kill_at="fit")  # the MLflow run is open; no epoch, no checkpoint yet
    assert killed.returncode != 0 and not (out / "history.csv").exists(), killed.stdout
    killed = repro(kill_at="test")  # every epoch trained and checkpointed; not tested
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert len(_runs_by_stage(project)["train_fp@lstm"]) == 1  # the first kill's run went on
    assert len((out / "history.csv").read_text().splitlines()) == 1 + epochs
    assert not (out / "model.ckpt").exists()

    rerun = repro()
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "resuming from" in rerun.stdout and " epoch 1/" not in rerun.stdout  # none again
    rows = (out / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, epochs + 1))
    assert (out / "model.ckpt").is_file() and (out / "metrics.json").is_file()
    assert not any((project / "checkpoints").iterdir())  # finished: resume state cleaned up
    (run,) = _runs_by_stage(project)["train_fp@lstm"]  # one run, through both kills
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")]
    assert sorted(steps) == list(range(1, epochs + 1)) and run.info.status == "FINISHED"
    assert "test_ppl" in run.data.metrics
    assert "didn't change, skipping" in repro().stdout  # dvc.lock records it as done
