"""Tests share the machine with other people's Ray: they stop only the Ray processes they
started. Fault: the suite ran `ray stop --force`, which ends every Ray process on the host,
and a sweep running beside the suite died when the suite reached that line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.pipeline.services import own_ray, processes_started_with

# Commands that end processes by name, whoever started them.
BY_NAME = re.compile(r"\bray\b\W+stop\b|\bpkill\b|\bkillall\b")


def test_no_test_or_stage_stops_processes_by_name():
    files = [REPO_ROOT / "Makefile"] + [
        path
        for folder in ("tests", "pipeline", "bench", ".ci")
        for path in sorted((REPO_ROOT / folder).rglob("*"))
        if path.is_file() and path.suffix in {".py", ".sh", ""} and path != Path(__file__)
    ]
    offending = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if BY_NAME.search(line) and not line.lstrip().startswith("#")
    ]
    assert offending == []


# A driver holding a local Ray instance up until it is killed.
HOLDER = (
    "import ray, time\n"
    "ray.init(address='local', include_dashboard=False, log_to_driver=False)\n"
    "print('up', flush=True)\n"
    "time.sleep(600)\n"
)


def _start_holder(env: dict[str, str]) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdout.readline().strip() == "up"
    return holder


@pytest.mark.slow
def test_a_tests_ray_clean_up_stops_its_own_processes_and_leaves_anothers_ray_running():
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    with own_ray(env) as neighbours_env:  # someone else's sweep, on the same machine
        neighbour = _start_holder(neighbours_env)
        neighbours = processes_started_with(f"RAY_TMPDIR={neighbours_env['RAY_TMPDIR']}")
        assert len(neighbours) >= 3  # the driver, GCS, raylet (and workers)
        with own_ray(env) as test_env:
            _start_holder(test_env)
            mine = f"RAY_TMPDIR={test_env['RAY_TMPDIR']}"
            assert processes_started_with(mine)
        assert processes_started_with(mine) == []  # the test's own Ray is gone, all of it
        assert not Path(test_env["RAY_TMPDIR"]).exists()  # and so is its temp folder
        assert neighbour.poll() is None  # the neighbour's driver lives on
        alive = processes_started_with(f"RAY_TMPDIR={neighbours_env['RAY_TMPDIR']}")
        assert set(neighbours) <= set(alive)  # and so does every process of its Ray
