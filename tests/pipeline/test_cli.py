"""A stage stopped by its user's input prints one line and exits 2; a bug keeps its traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import run_command
from pipeline.params import ParamsError
from tests.conftest import REPO_ROOT

READS_PARAMS = "every stage reads its settings from it"


def _stage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "command",
    [
        ["pipeline.prepare"],
        ["pipeline.train", "fp", "lstm"],
        ["pipeline.tune", "gru"],
        ["pipeline.report"],
        ["pipeline.export", "lstm"],
    ],
    ids=lambda command: command[0],
)
def test_a_typo_in_params_is_one_line_naming_the_key_and_exit_status_2(tmp_path: Path, command):
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text().replace("bptt:", "bpt:"))
    result = _stage(*command, "--params", str(params))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == f"error: {params} is invalid:"
    assert "data.bpt: Extra inputs are not permitted" in result.stderr


def test_hitnet_traceback_shows_the_traceback(tmp_path: Path):
    missing = tmp_path / "none.yaml"
    plain = _stage("pipeline.train", "fp", "gru", "--params", str(missing))
    assert plain.returncode == 2
    assert (
        plain.stderr.strip()
        == f"error: {missing}: file not found (every stage reads its settings from it)"
    )
    shown = _stage(
        "pipeline.train", "fp", "gru", "--params", str(missing), env={"HITNET_TRACEBACK": "1"}
    )
    assert shown.returncode == 1 and "Traceback" in shown.stderr


def test_a_bug_is_not_dressed_as_a_user_error():
    def buggy() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(buggy)

    def mistaken() -> None:
        raise ParamsError("params.yaml is invalid")

    with pytest.raises(SystemExit) as exit_:
        run_command(mistaken)
    assert exit_.value.code == 2


@pytest.mark.slow
def test_a_diverging_stage_exits_2_naming_the_loss_and_leaves_no_result(tmp_path: Path, ptb_dir):
    """Faults: lr 1e9 ended in OverflowError's traceback; a diverged run wrote its NaN model
    and "val_ppl": Infinity (not JSON), and MLflow said FINISHED."""
    from mlflow import MlflowClient

    from tests.pipeline.conftest import SMOKE, deep_update

    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    smoke = deep_update(deep_update(raw, SMOKE), {"train_fp": {"lr": 1e9}})
    params.write_text(yaml.safe_dump(smoke))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    out = tmp_path / "out"
    stage = ["pipeline.train", "fp", "lstm", "--params", str(params), "--data", str(ptb_dir)]
    result = subprocess.run(
        [sys.executable, "-m", *stage, "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path, "MLFLOW_TRACKING_URI": uri},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert re.search(r"diverged: the (train|val) loss is .* at epoch 1 \(lr 1e\+09\)", message)
    assert not (out / "metrics.json").exists() and not (out / "model.ckpt").exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hitnet-ptb").experiment_id])
    assert run.info.status == "FAILED"
