"""Horizon rank: how well a sweep trial's short horizon ranks the full ternary runs.

The tune stage scores each Ray Tune trial by its val PPW after a few epochs (``tune.epochs``)
and keeps the best; the ternary stage then trains that recipe for its full length. That only
picks well if the ranking of recipes after k epochs is the ranking after the full run. A trial
of k epochs trains the same recipe, with the same lr schedule, for the first k epochs of the
full run, so its val PPW is the full run's ``val_ppl`` at epoch k: the histories the hand
search left under ``results/h100/`` answer the question without training anything.

For each horizon k (1..20, plus ``--horizons``), this prints Spearman's rank correlation, over
the qualifying runs of one cell, between val_ppl at epoch k and the run's final val PPW: the
best val_ppl of the run (the epoch the stage keeps as its model), and also the last epoch's.
Ranks are taken within a cell (a sweep only ever ranks trials of one cell); both cells pooled
are reported too, for completeness. Then it lists the runs used and the folders skipped.

Spearman's rho is ``scipy.stats.spearmanr`` (average ranks for ties); scipy is installed
as a requirement of the pinned mlflow.

    python bench/horizon_rank.py --out results/h100/horizon_rank.md
    python bench/horizon_rank.py --horizons 30 40
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy.stats import spearmanr

CELLS = ("lstm", "gru")
MIN_EPOCHS = 40
MODEL_SIZE = 300  # embedding and hidden size of the paper's (and README's) models
DEFAULT_HORIZONS = tuple(range(1, 21))
LISTED_HORIZONS = (1, 4, 10, 20)  # the val columns of the run list
RHO_TARGET = 0.8

RULE = f"""A folder counts as one run if all of these hold:

- it is `search*/<run>/` or `runs/ternary/<cell>/` (the FP runs in `runs/fp/` are not
  scanned), and the cell is its name (`runs/ternary/`) or the first letter of its name
  (`l` = LSTM, `g` = GRU);
- it has `history.csv` and `params.yaml`;
- `params.yaml` trains a ternary model: `quant.weight: ttq`, `quant.activation: btq`;
- the model is 1 x {MODEL_SIZE}: `model.num_layers` 1, embedding and hidden size {MODEL_SIZE};
- its history is complete: one row for each epoch 1..E, where E is the ternary recipe's
  `epochs` for the cell (`train_ternary.per_cell.<cell>.epochs`, else
  `train_ternary.epochs`), and every val_ppl is finite (this drops runs cut by a time limit);
- E >= {MIN_EPOCHS};
- its history is not a byte-for-byte copy of a run found earlier (`runs/ternary/` holds
  copies of two search runs; search rounds are read first, in round order).

At horizon k, a run enters the correlation if it has at least k epochs (so every run does for
k <= {MIN_EPOCHS}). rho needs at least 3 runs and two distinct values on each side; else `-`."""


@dataclass(frozen=True)
class Run:
    """One full ternary run: its name (relative to the results root) and val_ppl per epoch."""

    name: str
    cell: str
    btq_eval: str
    val: tuple[float, ...]  # val_ppl of epoch 1, 2, ...

    def best(self) -> float:
        return min(self.val)

    def last(self) -> float:
        return self.val[-1]


FINALS: dict[str, Callable[[Run], float]] = {"best": Run.best, "last": Run.last}


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties; nan for fewer than 3 pairs or a side that
    is constant (no ranking to compare)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: {len(x)} x against {len(y)} y")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def cell_of(directory: Path) -> str | None:
    """``runs/ternary/<cell>`` by name; a search run by its first letter (``l-d3``, ``g40-...``)."""
    name = directory.name
    if name in CELLS:
        return name
    return {"l": "lstm", "g": "gru"}.get(name[:1])


def recipe_epochs(params: dict[str, Any], cell: str) -> int:
    """The ternary recipe's epochs for ``cell``: its per-cell value, else the shared one."""
    recipe = params["train_ternary"]
    own = ((recipe.get("per_cell") or {}).get(cell) or {}).get("epochs")
    return int(own if own is not None else recipe["epochs"])


def read_val(history: Path) -> tuple[list[int], list[float]]:
    """The epochs and val_ppl column of a ``history.csv``."""
    with history.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(row["epoch"]) for row in rows], [float(row["val_ppl"]) for row in rows]


def disqualified(params: dict[str, Any], cell: str, epochs: list[int], val: list[float]) -> str:
    """Why a run with these params and history fails ``RULE``; empty if it passes."""
    quant, model = params["quant"], params["model"]
    size = (model["num_layers"], model["embedding_size"], model["hidden_size"])
    planned = recipe_epochs(params, cell)
    if (quant["weight"], quant["activation"]) != ("ttq", "btq"):
        return f"not ternary ({quant['weight']} / {quant['activation']})"
    if size != (1, MODEL_SIZE, MODEL_SIZE):
        return f"model {size[0]} x {size[1]}/{size[2]}"
    if epochs != list(range(1, planned + 1)):
        return f"incomplete: {len(epochs)} of {planned} epochs"
    if not all(map(math.isfinite, val)):
        return "a val_ppl is not finite"
    if planned < MIN_EPOCHS:
        return f"{planned} epochs < {MIN_EPOCHS}"
    return ""


def qualify(directory: Path, name: str) -> Run | Skipped:
    """The run in ``directory`` if it passes ``RULE`` (all but the copy check), else why not."""
    history, params_file = directory / "history.csv", directory / "params.yaml"
    cell = cell_of(directory)
    if not history.is_file():
        return Skipped(name, "no history.csv")
    if not params_file.is_file():
        return Skipped(name, "no params.yaml")
    if cell is None:
        return Skipped(name, "cell not in the folder name")
    params = yaml.safe_load(params_file.read_text())
    epochs, val = read_val(history)
    reason = disqualified(params, cell, epochs, val)
    if reason:
        return Skipped(name, reason)
    return Run(name, cell, str(params["quant"].get("btq_eval", "stochastic")), tuple(val))


def round_number(directory: Path) -> int:
    """``search`` is round 1, ``search10`` round 10."""
    digits = re.sub(r"\D", "", directory.name)
    return int(digits) if digits else 1


def run_dirs(root: Path) -> list[Path]:
    """Candidate folders: search rounds in round order, then ``runs/ternary``."""
    rounds = sorted((d for d in root.glob("search*") if d.is_dir()), key=round_number)
    parents = [*rounds, root / "runs" / "ternary"]
    return [
        d for parent in parents if parent.is_dir() for d in sorted(parent.iterdir()) if d.is_dir()
    ]


def find_runs(root: Path) -> tuple[list[Run], list[Skipped]]:
    """The runs under ``root`` that pass ``RULE``, and the folders skipped with their reason."""
    runs: list[Run] = []
    skipped: list[Skipped] = []
    seen: dict[bytes, str] = {}
    for directory in run_dirs(root):
        name = directory.relative_to(root).as_posix()
        found = qualify(directory, name)
        if isinstance(found, Run):
            content = (directory / "history.csv").read_bytes()
            if content in seen:
                found = Skipped(name, f"copy of {seen[content]}")
            else:
                seen[content] = name
        (runs if isinstance(found, Run) else skipped).append(found)
    return runs, skipped


def rank_correlation(
    runs: Iterable[Run], k: int, final: Callable[[Run], float]
) -> tuple[int, float]:
    """How many runs reach epoch k, and rho between their val at k and their final val."""
    used = [run for run in runs if len(run.val) >= k]
    return len(used), spearman([run.val[k - 1] for run in used], [final(run) for run in used])


def fmt_rho(rho: float) -> str:
    return "-" if math.isnan(rho) else f"{rho:.2f}"


def groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """The runs of each cell, and all of them pooled."""
    by_cell = {cell: [run for run in runs if run.cell == cell] for cell in CELLS}
    return {**by_cell, "pooled": list(runs)}


def correlation_table(runs: Sequence[Run], horizons: Sequence[int], final: str) -> str:
    header = "| horizon k | n LSTM | rho LSTM | n GRU | rho GRU | n pooled | rho pooled |"
    lines = [header, "|" + "---|" * 7]
    for k in horizons:
        cells = [rank_correlation(group, k, FINALS[final]) for group in groups(runs).values()]
        lines.append(f"| {k} | " + " | ".join(f"{n} | {fmt_rho(rho)}" for n, rho in cells) + " |")
    return "\n".join(lines)


def first_reaching(runs: Sequence[Run], horizons: Sequence[int], final: str) -> str:
    """The smallest horizon whose rho reaches ``RHO_TARGET``, else where rho peaks."""
    rhos = [(k, rank_correlation(runs, k, FINALS[final])[1]) for k in horizons]
    reached = [k for k, rho in rhos if rho >= RHO_TARGET]
    if reached:
        later = [rho for k, rho in rhos if k > reached[0]]
        below = sum(not rho >= RHO_TARGET for rho in later)
        return f"k = {reached[0]} ({below} of the {len(later)} longer horizons below it again)"
    defined = [(rho, k) for k, rho in rhos if not math.isnan(rho)]
    if not defined:
        return "undefined (too few runs)"
    rho, k = max(defined)
    return f"none (peak {rho:.2f} at k = {k})"


def summary(runs: Sequence[Run], horizons: Sequence[int], root: Path) -> str:
    per_cell = groups(runs)
    counts = ", ".join(f"{cell.upper()} n = {len(per_cell[cell])}" for cell in CELLS)
    reach = {
        final: "; ".join(
            f"{cell.upper()} {first_reaching(per_cell[cell], horizons, final)}" for cell in CELLS
        )
        for final in FINALS
    }
    sizes = " and ".join(f"{len(per_cell[cell])} {cell.upper()}" for cell in CELLS)
    lengths = sorted({len(run.val) for run in runs}) or [0]
    return (
        "What this measures: whether a Ray Tune trial that trains a ternary recipe for only k "
        "epochs ranks recipes as their full runs do. For each horizon k, Spearman's rho between "
        "a run's val_ppl at epoch k (what a trial of k epochs reports: same recipe, same lr "
        "schedule up to k) and its final val PPW, over the full runs of one cell that the hand "
        f"search left in `{root.as_posix()}/search*/<run>/history.csv` and "
        f"`{root.as_posix()}/runs/ternary/<cell>/history.csv` (rule below; {counts}). "
        f"Smallest horizon with rho >= {RHO_TARGET}, final = best val of the run (the epoch the "
        f"stage keeps): {reach['best']}. With final = last epoch's val: {reach['last']}.\n\n"
        f"How much to trust it: {sizes} runs are few, and they were chosen by a hand search, "
        "not sampled as a sweep samples, so rho is weak evidence; one or two runs moving "
        "changes it visibly. The runs span whole rounds of the search (from plain QAT to the "
        "final recipes), whose differences show from the first epochs; a sweep over a narrow "
        "region (slopes, TTQ theta) ranks closer recipes, where rho is likely lower. Their "
        f"lengths differ ({lengths[0]} to {lengths[-1]} epochs), so the final val also measures "
        "how long each recipe was trained; the mode of validation differs between runs "
        "(`btq_eval` stochastic or deterministic, listed below); and some runs share their "
        "first epochs bit for bit (a recipe rerun longer, or changed only in a setting that "
        "acts late, such as the start of weight averaging), so they tie at short horizons and "
        "a trial that short cannot tell them apart. Pooling both cells mostly ranks LSTM "
        "against GRU; the per-cell columns are the ones a sweep faces."
    )


def run_list(runs: Sequence[Run]) -> str:
    """Each cell's runs, best final first, with val at ``LISTED_HORIZONS`` and at the end."""
    val_columns = " | ".join(f"val @{k}" for k in LISTED_HORIZONS)
    sections = []
    for cell in CELLS:
        group = [run for run in runs if run.cell == cell]
        lines = [
            f"### {cell.upper()} ({len(group)} runs)",
            "",
            f"| run | epochs | btq_eval | {val_columns} | best val (epoch) | last val |",
            "|" + "---|" * (len(LISTED_HORIZONS) + 5),
        ]
        for run in sorted(group, key=Run.best):
            vals = " | ".join(f"{run.val[k - 1]:.1f}" for k in LISTED_HORIZONS)
            best_epoch = run.val.index(run.best()) + 1
            lines.append(
                f"| {run.name} | {len(run.val)} | {run.btq_eval} | {vals} | "
                f"{run.best():.1f} ({best_epoch}) | {run.last():.1f} |"
            )
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def skipped_list(skipped: Sequence[Skipped]) -> str:
    return "\n".join(f"- {entry.name}: {entry.reason}" for entry in skipped)


def report(root: Path, horizons: Sequence[int]) -> str:
    runs, skipped = find_runs(root)
    return (
        "\n\n".join(
            [
                "# Does a short sweep horizon rank the full ternary runs?",
                summary(runs, horizons, root),
                "## Spearman's rho, final = best val of the run",
                correlation_table(runs, horizons, "best"),
                "## Spearman's rho, final = last epoch's val",
                correlation_table(runs, horizons, "last"),
                "## The rule",
                RULE,
                "## Runs used",
                run_list(runs),
                "## Folders skipped",
                skipped_list(skipped),
            ]
        )
        + "\n"
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a horizon is an epoch, at least 1: {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("results/h100"))
    parser.add_argument("--horizons", type=positive_int, nargs="+", default=[])
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    text = report(args.root, sorted({*DEFAULT_HORIZONS, *args.horizons}))
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
