"""Tests share the machine with other people's Ray: they stop only the Ray processes they
started, by PID. Fault: the suite once stopped every Ray process on the host, and a sweep
running beside the suite died when the suite reached that line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pipeline.services import own_ray, processes_started_with, start_local_sweep_ray


@pytest.mark.slow
def test_a_tests_ray_clean_up_stops_its_own_processes_and_leaves_anothers_ray_running():
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    with own_ray(env) as neighbours_env:  # someone else's sweep, on the same machine
        neighbour, address = start_local_sweep_ray(neighbours_env)
        assert address
        neighbours = processes_started_with(f"RAY_TMPDIR={neighbours_env['RAY_TMPDIR']}")
        assert len(neighbours) >= 3  # the driver, GCS, raylet (and workers)
        with own_ray(env) as test_env:
            assert start_local_sweep_ray(test_env)[1]
            mine = f"RAY_TMPDIR={test_env['RAY_TMPDIR']}"
            assert processes_started_with(mine)
        assert processes_started_with(mine) == []  # the test's own Ray is gone, all of it
        assert not Path(test_env["RAY_TMPDIR"]).exists()  # and so is its temp folder
        assert neighbour.poll() is None  # the neighbour's driver lives on
        alive = processes_started_with(f"RAY_TMPDIR={neighbours_env['RAY_TMPDIR']}")
        assert set(neighbours) <= set(alive)  # and so does every process of its Ray
