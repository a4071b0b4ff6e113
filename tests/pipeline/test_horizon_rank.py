"""bench/horizon_rank.py: its Spearman rho with ties, and which run folders it counts.

The script is imported as a module (``bench`` is a namespace package on pytest's
``pythonpath``); the runs are tiny fake ``history.csv`` / ``params.yaml`` pairs in tmp_path.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from bench import horizon_rank


def write_run(
    directory: Path,
    val: list[float],
    planned: int | None = None,
    weight: str = "ttq",
) -> None:
    """A run folder: params of a 1 x 300 model planned for ``planned`` epochs (default: as
    many as ``val`` has) and a history with one row per value of ``val``."""
    directory.mkdir(parents=True)
    params = {
        "model": {"num_layers": 1, "embedding_size": 300, "hidden_size": 300},
        "quant": {"weight": weight, "activation": "btq", "btq_eval": "deterministic"},
        "train_ternary": {"epochs": 99, "per_cell": {"lstm": {"epochs": planned or len(val)}}},
    }
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    rows = [f"{epoch},1.0,{v},1.0" for epoch, v in enumerate(val, start=1)]
    (directory / "history.csv").write_text("\n".join(["epoch,train_ppl,val_ppl,lr", *rows]) + "\n")


def test_spearman_averages_tied_ranks() -> None:
    # x ranks 1, 2.5, 2.5, 4 (a tie); y ranks 1, 3, 2, 4. Centred: (-1.5, 0, 0, 1.5) and
    # (-1.5, 0.5, -0.5, 1.5): rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    rho = horizon_rank.spearman([10.0, 20.0, 20.0, 30.0], [1.0, 7.0, 5.0, 9.0])
    assert math.isclose(rho, 3 / math.sqrt(10))
    assert math.isclose(horizon_rank.spearman([1.0, 2.0, 3.0], [9.0, 8.0, 7.0]), -1.0)
    assert math.isnan(horizon_rank.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(horizon_rank.spearman([1.0, 2.0], [1.0, 2.0]))


def test_find_runs_applies_the_rule(tmp_path: Path) -> None:
    long = horizon_rank.MIN_EPOCHS
    # three full LSTM runs whose order at epoch 1 is their final order
    for name, start in [("l-a", 150.0), ("l-b", 160.0), ("l-c", 170.0)]:
        write_run(tmp_path / "search2" / name, [start - epoch for epoch in range(long)])
    write_run(tmp_path / "search2" / "l-short", [150.0] * (long - 10))
    write_run(tmp_path / "search3" / "l-cut", [150.0] * 12, planned=long)
    write_run(tmp_path / "search3" / "l-fp", [90.0] * long, weight="none")
    (tmp_path / "search3" / "report").mkdir()
    copied = tmp_path / "runs" / "ternary" / "lstm"
    write_run(copied, [150.0 - epoch for epoch in range(long)])

    runs, skipped = horizon_rank.find_runs(tmp_path)

    assert [run.name for run in runs] == ["search2/l-a", "search2/l-b", "search2/l-c"]
    assert {run.cell for run in runs} == {"lstm"}
    reasons = {entry.name: entry.reason for entry in skipped}
    assert reasons == {
        "search2/l-short": f"{long - 10} epochs < {long}",
        "search3/l-cut": f"incomplete: 12 of {long} epochs",
        "search3/l-fp": "not ternary (none / btq)",
        "search3/report": "no history.csv",
        "runs/ternary/lstm": "copy of search2/l-a",
    }
    used, rho = horizon_rank.rank_correlation(runs, 1, horizon_rank.Run.best)
    assert used == 3 and math.isclose(rho, 1.0)
    assert horizon_rank.rank_correlation(runs, long + 1, horizon_rank.Run.best)[0] == 0
    report = horizon_rank.report(tmp_path, [1, 2])
    assert "| 1 | 3 | 1.00 | 0 | - | 3 | 1.00 |" in report
    reached = "LSTM k = 1 (0 of the 1 longer horizons below it again)"
    assert f"{reached}; GRU undefined (too few runs)" in report
