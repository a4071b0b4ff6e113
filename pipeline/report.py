"""Stage `report`: test perplexity of every model beside the paper's, and learning curves.

Each ternary model (one per cell and training seed) is tested with BTQ drawn, once per seed
of ``report.eval_seeds`` (their mean is the model's figure), and with BTQ rounded. Per cell
the report gives the mean ± std of those figures over the training seeds. Writes
``report/``: ``README.md`` (the tables), ``metrics.json`` (per cell and kind ``{"seeds":
{seed: test_ppl}, "mean", "std"}``; what `dvc metrics show` prints) and ``curves.png``
(validation perplexity per epoch of every model, and test perplexities beside the paper's).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI
import matplotlib.pyplot as plt

from hitnet.lightning_module import LanguageModelTask
from hitnet.quantizers import BTQEvalMode
from pipeline.builders import compile_as_configured, datamodule_for, evaluation_trainer, model_dir
from pipeline.cli import run_command
from pipeline.history import read_history
from pipeline.model_registry import registered_name
from pipeline.paper import PAPER
from pipeline.params import Params, load_params
from pipeline.tracking import StageRun, stage_run

KINDS = ("fp", "ternary")


def load_for_evaluation(checkpoint: Path, params: Params, mode: BTQEvalMode) -> LanguageModelTask:
    """A checkpoint's model evaluating BTQ in ``mode`` (whatever mode it validated with), its
    recurrence compiled as the training stages compile it."""
    task = LanguageModelTask.load_from_checkpoint(checkpoint, map_location="cpu")
    if task.model.config.quant.btq_eval != mode:  # same weights, other evaluation
        weights = task.state_dict()
        task = LanguageModelTask(**{**task.hparams, "model": task.model.config.evaluated_as(mode)})
        task.load_state_dict(weights)
    compile_as_configured(task, params.hardware)
    return task


def test_perplexities(
    checkpoint: Path,
    params: Params,
    data_dir: Path,
    limit_batches: int | None,
    mode: BTQEvalMode = "stochastic",
) -> list[float]:
    """Test perplexity of a checkpoint: once per seed of ``report.eval_seeds`` when BTQ draws
    at evaluation (``mode`` stochastic and a model with noise), else once."""
    task = load_for_evaluation(checkpoint, params, mode)
    quant = task.model.config.quant
    stochastic = quant.needs_noise and quant.btq_eval == "stochastic"
    seeds = params.report.eval_seeds if stochastic else params.report.eval_seeds[:1]
    trainer = evaluation_trainer(params, limit_batches)
    datamodule = datamodule_for(params, data_dir)
    results = []
    for seed in seeds:
        task.hparams.eval_seed = seed
        (result,) = trainer.test(task, datamodule, verbose=False)
        results.append(float(result["test_ppl"]))
    return results


def over_seeds(by_seed: dict[int, float]) -> dict[str, Any]:
    """``{"seeds": {seed: value}, "mean": x, "std": y}``: the spread over training seeds."""
    values = list(by_seed.values())
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "seeds": {str(seed): round(value, 3) for seed, value in by_seed.items()},
        "mean": round(statistics.fmean(values), 3),
        "std": round(spread, 3),
    }


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The headline table, then every training seed's figures."""
    lines = [
        "| model | FP (ours) | ternary (ours) | ternary, BTQ rounded | gap FP -> ternary "
        "| paper FP | paper ternary (HitNet) | previous best ternary |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell, kinds in results.items():
        fp, ternary, paper = kinds["fp"], kinds["ternary"], PAPER[cell]
        rounded = ternary["rounded"]
        lines.append(
            f"| {cell.upper()} | {fp['mean']:.1f} | {ternary['mean']:.1f} ± {ternary['std']:.1f} "
            f"| {rounded['mean']:.1f} ± {rounded['std']:.1f} | "
            f"{ternary['mean'] - fp['mean']:+.1f} | {paper['fp']} | {paper['ternary']} | "
            f"{paper['previous_ternary']:g} |"
        )
    lines += [
        "",
        "| ternary model | training seed | test PPW, BTQ drawn (mean ± std over eval seeds) "
        "| test PPW, BTQ rounded | paper ternary |",
        "|---|---|---|---|---|",
    ]
    for cell, kinds in results.items():
        ternary = kinds["ternary"]
        for seed, value in ternary["seeds"].items():
            lines.append(
                f"| {cell.upper()} | {seed} | {value:.2f} ± {ternary['eval_std'][seed]:.2f} "
                f"| {ternary['rounded']['seeds'][seed]:.2f} | {PAPER[cell]['ternary']} |"
            )
    some = next(iter(results.values()))["ternary"]
    note = (
        '\nTernary models: TTQ weights, BTQ activations. "ternary (ours)": mean ± std over '
        f"{len(some['seeds'])} training seeds of each model's test PPW with BTQ drawn at "
        f'evaluation, itself the mean over {some["eval_seeds"]} evaluation seeds; "BTQ '
        'rounded": the same models with BTQ rounded to the nearest level.\n'
    )
    return "\n".join(lines) + "\n" + note


def plot(histories: dict[str, dict[str, Any]], results: dict[str, Any], path: Path) -> None:
    """Per cell, validation perplexity per epoch (FP, then every training seed's ternary
    model continuing from it); last, test perplexities (mean ± std over seeds) and the paper's."""
    cells = list(histories)
    figure, axes = plt.subplots(1, len(cells) + 1, figsize=(5 * (len(cells) + 1), 4.2))
    for axis, cell in zip(axes, cells, strict=False):
        fp_rows = histories[cell]["fp"]
        axis.plot(
            [r["epoch"] for r in fp_rows],
            [r["val_ppl"] for r in fp_rows],
            marker=".",
            label="fp (ours)",
        )
        for seed, rows in histories[cell]["ternary"].items():
            axis.plot(
                [len(fp_rows) + r["epoch"] for r in rows],  # the ternary model continues FP
                [r["val_ppl"] for r in rows],
                "--",
                linewidth=1,
                label=f"ternary (ours), seed {seed}",
            )
        for kind, color in (("fp", "grey"), ("ternary", "black")):
            axis.axhline(
                PAPER[cell][kind],
                color=color,
                linewidth=0.8,
                linestyle=":",
                label=f"paper {kind} (test)",
            )
        axis.set(
            title=f"{cell.upper()}: validation perplexity (ternary continues FP)",
            xlabel="epoch",
            ylabel="perplexity",
            yscale="log",
        )
        axis.legend(fontsize=7)
    bars = axes[-1]
    labels = [f"{cell} {kind}" for cell in cells for kind in KINDS]
    ours = [results[cell][kind] for cell in cells for kind in KINDS]
    positions = range(len(labels))
    drawn = bars.bar(
        [p - 0.2 for p in positions],
        [value["mean"] for value in ours],
        yerr=[value["std"] for value in ours],
        width=0.4,
        label="ours (mean ± std over seeds)",
    )
    bars.bar_label(drawn, fmt="%.1f", fontsize=7)
    paper = [PAPER[cell][kind] for cell in cells for kind in KINDS]
    bars.bar([p + 0.2 for p in positions], paper, width=0.4, label="paper")
    bars.set_xticks(list(positions), labels, rotation=20)
    bars.set(title="test perplexity (lower is better)", ylabel="perplexity")
    bars.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate_models(params: Params, runs_dir: Path, data_dir: Path) -> tuple[dict, dict]:
    """(test perplexities, validation histories) by cell, then kind; ternary per seed."""
    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, dict[str, Any]] = {}
    for cell in params.cells:
        fp_dir = model_dir("fp", cell, runs=runs_dir)
        print(f"report: testing fp {cell}", flush=True)
        limit = params.recipe("fp", cell).limit_eval_batches
        (fp_ppl,) = test_perplexities(fp_dir / "model.ckpt", params, data_dir, limit)
        drawn, drawn_std, rounded, curves = {}, {}, {}, {}
        limit = params.recipe("ternary", cell).limit_eval_batches
        for seed in params.training_seeds:
            folder = model_dir("ternary", cell, seed, runs_dir)
            print(f"report: testing ternary {cell}, training seed {seed}", flush=True)
            checkpoint = folder / "model.ckpt"
            draws = test_perplexities(checkpoint, params, data_dir, limit, "stochastic")
            drawn[seed] = statistics.fmean(draws)
            drawn_std[str(seed)] = round(statistics.stdev(draws) if len(draws) > 1 else 0.0, 3)
            (rounded[seed],) = test_perplexities(
                checkpoint, params, data_dir, limit, "deterministic"
            )
            curves[seed] = read_history(folder / "history.csv")
        results[cell] = {
            "fp": over_seeds({params.seed: fp_ppl}),
            "ternary": {
                **over_seeds(drawn),
                "eval_std": drawn_std,
                "eval_seeds": len(params.report.eval_seeds),
                "rounded": over_seeds(rounded),
            },
        }
        histories[cell] = {"fp": read_history(fp_dir / "history.csv"), "ternary": curves}
    return results, histories


def validation_ppl(folder: Path) -> float:
    """A trained model's best validation perplexity, from its stage's metrics.json."""
    return float(json.loads((folder / "metrics.json").read_text(encoding="utf-8"))["val_ppl"])


def mark_best_models(run: StageRun, params: Params, runs_dir: Path) -> None:
    """The registry's alias `best`, per kind and cell: the lowest validation perplexity."""
    for cell in params.cells:
        for kind, seeds in (("fp", [None]), ("ternary", params.training_seeds)):
            folders = [model_dir(kind, cell, seed, runs_dir) for seed in seeds]
            run.set_best(
                registered_name(kind, cell),
                {folder / "model.ckpt": validation_ppl(folder) for folder in folders},
            )


def report(params: Params, runs_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    used = params.model_dump(include={"cells", "training_seeds", "report", "hardware"})
    with stage_run(params.tracking, "report", used) as run:
        results, histories = evaluate_models(params, runs_dir, data_dir)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
        table = markdown_table(results)
        (out_dir / "README.md").write_text(
            "# HitNet on PTB: test perplexity per word\n\n"
            + table
            + "\n![learning curves and test perplexities](curves.png)\n",
            encoding="utf-8",
        )
        plot(histories, results, out_dir / "curves.png")
        run.log_metrics(flat_metrics(results), step=0)
        if params.tracking.enabled:
            mark_best_models(run, params, runs_dir)
        for name in ("README.md", "metrics.json", "curves.png"):
            run.log_artifact(out_dir / name, "report")
    print(table, flush=True)
    return results


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow's metric names for the report's figures, e.g. ``lstm_ternary_test_ppl_seed1``."""
    flat = {}
    for cell, kinds in results.items():
        for kind, value in kinds.items():
            prefix = f"{cell}_{kind}_test_ppl"
            flat |= {prefix: value["mean"], f"{prefix}_std": value["std"]}
            flat |= {f"{prefix}_seed{seed}": v for seed, v in value["seeds"].items()}
            if "rounded" in value:
                flat[f"{prefix}_rounded"] = value["rounded"]["mean"]
    return flat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--data", type=Path, default=Path("data/ptb"))
    parser.add_argument("--out", type=Path, default=Path("report"))
    args = parser.parse_args(argv)
    report(load_params(args.params), args.runs, args.data, args.out)


if __name__ == "__main__":
    run_command(main)
