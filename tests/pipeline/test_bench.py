"""The benchmark scripts run end to end on CPU and report what their tables promise.

No timing is asserted (CI machines vary); the tests check that every level / variant was
measured and that ratios are taken against the baseline measured in the same run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import run_tool

pytestmark = pytest.mark.slow


def run_bench(
    script: str, tmp_path: Path, *args: str
) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    """Runs ``bench/<script>.py`` from the repository with ``--json``: (its report, the run)."""
    out = tmp_path / f"{script}.json"
    result = run_tool(REPO_ROOT, sys.executable, f"bench/{script}.py", *args, "--json", str(out))
    return json.loads(out.read_text()), result


def _sweep_throughput(project: Path, *args: str) -> tuple[dict[str, Any], str]:
    """bench/sweep_throughput.py at smoke size in ``project``: (its report, its stdout)."""
    run_tool(project, sys.executable, "-m", "pipeline.prepare")
    result = run_tool(
        project,
        sys.executable,
        "bench/sweep_throughput.py",
        *args,
        *("--epochs", "2", "--limit-train-batches", "3", "--limit-eval-batches", "2"),
        *("--json", "throughput.json"),
    )
    return json.loads((project / "throughput.json").read_text()), result.stdout


def test_sweep_throughput_measures_every_concurrency_level(smoke_project: Path) -> None:
    report, stdout = _sweep_throughput(smoke_project, "--levels", "1", "2")
    assert report["device"] == "cpu"
    rows = report["rows"]
    assert [row["trials"] for row in rows] == [1, 2]
    assert [row["trial_epochs"] for row in rows] == [2, 4]  # no trial was stopped early
    for row in rows:
        assert row["wall_epochs_per_min"] > 0 and row["steady_epochs_per_min"] > 0
        steady = 60 * row["trials"] / row["steady_epoch_s"]
        assert math.isclose(row["steady_epochs_per_min"], steady)
    assert "| 1 | 0 |" in stdout and "(1.00x)" in stdout


def test_sweep_throughput_scales_over_gpu_counts(smoke_project: Path) -> None:
    """On a CPU, Ray's GPUs are fake: the wiring of G GPUs x K trials each, not a speed."""
    report, stdout = _sweep_throughput(smoke_project, "--gpus", "1", "2", "--trials-per-gpu", "1")
    rows = report["rows"]
    assert [(row["gpus"], row["trials"], row["trial_epochs"]) for row in rows] == [
        (1, 1, 2),
        (2, 2, 4),
    ]
    assert "up to 2 trials at once, 1 GPU and 1 CPU each (the Ray cluster has 2 GPUs)" in stdout
    assert "| 2 | 2 |" in stdout


@pytest.mark.parametrize(("slopes", "named"), [("1,1", ""), ("2,0.5", ", slopes 2/0.5")])
def test_step_time_reports_each_variant_against_torch(
    tmp_path: Path, slopes: str, named: str
) -> None:
    report, _ = run_bench(
        "step_time",
        tmp_path,
        *("--device", "cpu", "--steps", "2", "--warmup", "1", "--cells", "gru"),
        *("--slopes", slopes),
    )
    sigma, tanh = (float(value) for value in slopes.split(","))
    assert report["slopes"] == {"sigma": sigma, "tanh": tanh}
    baseline, *others = report["results"]
    assert baseline["ratio"] == 1.0 and len(others) == 4
    assert others[-1]["variant"].endswith("+ distillation")
    ternary = [result["variant"] for result in others[1:]]
    for variant in ternary:
        assert variant.startswith(f"SlopedGRU ternary{named}"), variant
        assert variant.count("slopes") == named.count("slopes"), variant
    for result in others:
        assert math.isclose(result["ratio"], result["median_ms"] / baseline["median_ms"])
        assert math.isfinite(result["final_loss"])


def test_cpu_inference_measures_every_variant_against_its_baseline(tmp_path: Path) -> None:
    report, result = run_bench(
        "cpu_inference",
        tmp_path,
        *("--hidden", "8", "--vocab", "40", "--batches", "1,3", "--bptt", "5"),
        *("--repeats", "2", "--warmup", "1"),
    )
    assert sorted(report["sizes"]) == ["gru", "lstm"]
    for size in report["sizes"].values():
        assert size["recurrent_weights_ratio"] > 10 and size["file_bytes"] > 0
    rows = report["rows"]
    groups = {(row["table"], row["cell"], row["batch"]) for row in rows}
    assert groups == {
        (t, c, b) for t in ("scoring", "matmul") for c in ("lstm", "gru") for b in (1, 3)
    }
    for table, cell, batch in groups:
        base, *others = [
            r for r in rows if (r["table"], r["cell"], r["batch"]) == (table, cell, batch)
        ]
        assert base["ratio"] == 1.0 and len(others) == (2 if table == "scoring" else 3)
        for row in others:
            assert math.isclose(row["ratio"], row["median_ms"] / base["median_ms"])
        for row in [base, *others]:
            if table == "scoring":
                assert math.isclose(row["tokens_per_s"], batch * 5 / (row["median_ms"] / 1e3))
    assert "ternary from the packed file" in result.stdout


def test_multirun_throughput_measures_stacked_runs_and_processes_against_one(
    tmp_path: Path,
) -> None:
    report, result = run_bench(
        "multirun_throughput",
        tmp_path,
        *("--device", "cpu", "--cell", "gru", "--runs", "1", "2", "--steps", "2"),
        *("--warmup", "1", "--hidden", "8", "--vocab", "30", "--batch", "2", "--bptt", "3"),
    )
    assert (report["cell"], report["compile"], report["distill"]) == ("gru", None, True)
    base, *rows = report["rows"]
    assert (base["mode"], base["runs"], base["step_ratio"], base["throughput_ratio"]) == (
        "single",
        1,
        1.0,
        1.0,
    )
    assert [(row["mode"], row["runs"]) for row in rows] == [
        ("stacked", 1),
        ("processes", 1),
        ("stacked", 2),
        ("processes", 2),
    ]
    for row in [base, *rows]:
        per_min = row["runs"] * 60e3 / (row["median_ms"] * report["epoch_steps"])
        assert math.isclose(row["epochs_per_min"], per_min)
        assert math.isclose(row["throughput_ratio"], per_min / base["epochs_per_min"])
        assert math.isclose(row["step_ratio"], row["median_ms"] / base["median_ms"])
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert math.isfinite(row["final_loss"])
    assert "| processes | 2 |" in result.stdout


def test_compile_cache_times_each_setting_in_its_own_process_against_the_cold_one(
    tmp_path: Path,
) -> None:
    report, result = run_bench(
        "compile_cache", tmp_path, *("--settings", "2:0.5", "1.5:0.6", "--steps", "2")
    )
    rows = report["rows"]
    assert [(row["slope"], row["ttq_threshold"]) for row in rows] == [(2.0, 0.5), (1.5, 0.6)]
    assert rows[0]["ratio"] == 1.0
    assert math.isclose(
        rows[1]["ratio"], rows[1]["first_step_s"] / rows[0]["first_step_s"], rel_tol=0.02
    )
    assert report["mode"] == "default" and "the cold one" in result.stdout
