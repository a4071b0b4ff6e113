"""A stage stopped by its user's input prints one line and exits 2; a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
