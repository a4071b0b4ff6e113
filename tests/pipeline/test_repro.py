"""pipeline/repro.py: stages in dependency order, independent ones at once, a failure stops
new starts. The whole DAG through it is tests/pipeline/test_dvc_repro.py's."""

from __future__ import annotations

import os
import sys

import pytest

from pipeline.repro import Schedule, run, visible_gpus, with_upstream

# a diamond, as dvc.yaml's: b and c both need a; d needs both
DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def _sleep(seconds: float, exit_code: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds}); exit({exit_code})"]


def test_a_stage_is_ready_once_everything_it_needs_is_done_and_a_job_is_free():
    schedule = Schedule(DIAMOND, jobs=1)
    assert schedule.ready() == ["a"]
    schedule.done.add("a")
    assert schedule.ready() == ["b"]  # one job
    schedule.jobs = 2
    assert schedule.ready() == ["b", "c"]
    schedule.running |= {"b", "c"}
    assert schedule.ready() == []  # d waits for both
    schedule.running.clear()
    schedule.done |= {"b"}
    schedule.failed.append("c")
    assert schedule.ready() == [] and schedule.finished()


def test_independent_stages_run_at_once_and_dependents_after():
    lines: list[str] = []
    spans = run(DIAMOND, jobs=2, command=lambda name: _sleep(0.5), write=lines.append)
    assert set(spans) == set(DIAMOND)
    a_end, (b_start, b_end), (c_start, c_end) = spans["a"][1], spans["b"], spans["c"]
    assert a_end <= b_start and a_end <= c_start
    assert b_start < c_end and c_start < b_end  # b and c overlapped
    assert spans["d"][0] >= max(b_end, c_end)
    assert any(line.startswith("repro: d done in") for line in lines)


def test_targets_take_themselves_and_everything_upstream_only():
    assert with_upstream(DIAMOND, ["b"]) == {"a": [], "b": ["a"]}
    assert with_upstream(DIAMOND, ["b", "c"]) == {"a": [], "b": ["a"], "c": ["a"]}
    assert with_upstream(DIAMOND, ["d"]) == DIAMOND
    with pytest.raises(ValueError, match=r"no stage e in dvc\.yaml; its stages are: a, b, c, d"):
        with_upstream(DIAMOND, ["b", "e"])


def test_a_failed_stage_stops_new_starts_and_names_itself():
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="stage b failed"):
        run(
            DIAMOND,
            jobs=2,
            command=lambda name: _sleep(0.1, exit_code=3 if name == "b" else 0),
            write=lines.append,
        )
    assert not any("starting d" in line for line in lines)
    assert any(line.startswith("repro: b failed (exit 3)") for line in lines)


def test_every_line_a_stage_prints_is_echoed_with_its_name():
    lines: list[str] = []
    command = [sys.executable, "-c", "print('one'); print('two')"]
    run({"only": []}, jobs=1, command=lambda name: command, write=lines.append)
    assert "[only] one\n" in lines and "[only] two\n" in lines


def test_on_several_gpus_each_training_stage_gets_the_least_busy_one_and_a_sweep_all():
    stages = {"train@a": [], "train@b": [], "train@c": [], "tune@a": []}
    lines: list[str] = []
    show = "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(0.5)"
    run(
        stages,
        jobs=3,
        command=lambda name: [sys.executable, "-c", show],
        write=lines.append,
        gpus=["2", "5"],
    )
    seen = {line.split("]")[0][1:]: line.split()[-1] for line in lines if line.startswith("[")}
    # three at once on two GPUs: the third shares the first (a tie); the sweep sees both
    assert seen == {"train@a": "2", "train@b": "5", "train@c": "2", "tune@a": "2,5"}
    assert "repro: starting train@a on GPU 2\n" in lines


def test_one_gpu_or_none_leaves_the_environment_as_it_is():
    lines: list[str] = []
    show = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    for gpus in ([], ["0"]):
        run({"train@a": []}, 1, lambda name: [sys.executable, "-c", show], lines.append, env, gpus)
    assert [line for line in lines if line.startswith("[")] == ["[train@a] unset\n"] * 2


@pytest.mark.parametrize(("visible", "expected"), [("0,3", ["0", "3"]), ("", []), ("7", ["7"])])
def test_the_gpus_to_share_are_cuda_visible_devices_when_set(visible, expected):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": visible}) == expected
