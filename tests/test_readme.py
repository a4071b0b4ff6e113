"""README's results tables are the pipeline's files, not typed numbers: each figure is checked
against the file under results/ it comes from."""

from __future__ import annotations

import json
import statistics

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = REPO_ROOT / "results"


def _row(first_cell: str) -> list[str]:
    """The cells of README's table row that starts with ``first_cell``, bold marks removed."""
    (line,) = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")][1:]


def _metrics(path: str) -> dict:
    return json.loads((RESULTS / path).read_text(encoding="utf-8"))


def test_the_one_seed_table_is_the_reports_files():
    drawn, rounded = (
        _metrics("h100/report/metrics.json"),
        _metrics("h100/report-rounded/metrics.json"),
    )
    for cell, paper in (("lstm", ["97.2", "110.3", "126"]), ("gru", ["102.7", "113.5", "142"])):
        fp, mean, std = (
            drawn[f"{cell}_{key}"]
            for key in ("fp_test_ppl", "ternary_test_ppl", "ternary_test_ppl_std")
        )
        assert _row(cell.upper()) == [
            f"{fp:.1f}",
            f"{mean:.1f} ± {std:.1f}",
            f"{rounded[f'{cell}_ternary_test_ppl']:.1f}",
            f"{mean - fp:+.1f}",
            *paper,
        ]


def test_the_training_seed_table_is_the_runs_files():
    runs = [_metrics(f"h200/search12/l-m35-s{seed}/metrics.json") for seed in range(3)]
    for label, key in (
        ("test PPW, BTQ rounded (the stage's test)", "test_ppl"),
        ("best val PPW, BTQ rounded", "val_ppl"),
    ):
        values = [run[key] for run in runs]
        spread = f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert _row(label)[:4] == [*(f"{value:.2f}" for value in values), spread]
