"""pipeline/repro.py: stages in dependency order, independent ones at once, a failure stops
new starts. The whole DAG through it is tests/pipeline/test_dvc_repro.py's."""

from __future__ import annotations

import sys

import pytest

from pipeline.repro import Schedule, run

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
