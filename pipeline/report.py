"""Stage `report`: test perplexity of every model beside the paper's, and learning curves.

Ternary models with stochastic BTQ evaluation are tested once per seed of
``report.eval_seeds``: the table gives mean ± standard deviation. Writes ``report/``:
``README.md`` (the table), ``metrics.json`` (what `dvc metrics show` prints) and
``curves.png`` (validation perplexity per epoch of every model, and test perplexities
beside the paper's).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI
import matplotlib.pyplot as plt
import pytorch_lightning as pl

from hitnet.lightning_module import LanguageModelTask
from pipeline.history import read_history
from pipeline.params import Params, load_params
from pipeline.tracking import stage_run
from pipeline.train import compile_as_configured, datamodule_for

# HitNet (NeurIPS 2018), PTB test perplexity per word, 1x300 (../shared/HITNET.md).
PAPER = {
    "lstm": {"fp": 97.2, "ternary": 110.3, "previous_ternary": 126.0},
    "gru": {"fp": 102.7, "ternary": 113.5, "previous_ternary": 142.0},
}
KINDS = ("fp", "ternary")


def load_for_evaluation(checkpoint: Path, params: Params) -> LanguageModelTask:
    """A checkpoint's model, evaluating BTQ as the report's params say (whatever mode the
    model validated with), its recurrence compiled as the training stages compile it."""
    task = LanguageModelTask.load_from_checkpoint(checkpoint, map_location="cpu")
    mode = params.report.evaluation_mode(params.quant)
    if task.model.config.quant.btq_eval != mode:  # same weights, other evaluation
        weights = task.state_dict()
        task = LanguageModelTask(**{**task.hparams, "model": task.model.config.evaluated_as(mode)})
        task.load_state_dict(weights)
    compile_as_configured(task, params.hardware)
    return task


def test_perplexities(
    checkpoint: Path, params: Params, data_dir: Path, limit_batches: int | None
) -> list[float]:
    """Test perplexity of a checkpoint, once per evaluation seed when BTQ draws at eval."""
    task = load_for_evaluation(checkpoint, params)
    quant = task.model.config.quant
    stochastic = quant.needs_noise and quant.btq_eval == "stochastic"
    seeds = params.report.eval_seeds if stochastic else params.report.eval_seeds[:1]
    trainer = pl.Trainer(
        **params.hardware.trainer_kwargs(),
        limit_test_batches=limit_batches,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = datamodule_for(params, data_dir)
    results = []
    for seed in seeds:
        task.hparams.eval_seed = seed
        (result,) = trainer.test(task, datamodule, verbose=False)
        results.append(float(result["test_ppl"]))
    return results


def summarize(perplexities: list[float]) -> dict[str, float]:
    spread = statistics.stdev(perplexities) if len(perplexities) > 1 else 0.0
    return {"mean": statistics.fmean(perplexities), "std": spread, "n": len(perplexities)}


def markdown_table(results: dict[str, dict[str, dict[str, float]]], btq_eval: str) -> str:
    lines = [
        "| model | FP test PPW (ours) | ternary test PPW (ours) | gap FP -> ternary "
        "| paper FP | paper ternary (HitNet) | previous best ternary |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell, kinds in results.items():
        fp, ternary = kinds["fp"], kinds["ternary"]
        spread = f" ± {ternary['std']:.1f} (n={ternary['n']})" if ternary["n"] > 1 else ""
        paper = PAPER[cell]
        lines.append(
            f"| {cell.upper()} | {fp['mean']:.1f} | {ternary['mean']:.1f}{spread} | "
            f"{ternary['mean'] - fp['mean']:+.1f} | {paper['fp']} | {paper['ternary']} | "
            f"{paper['previous_ternary']:g} |"
        )
    note = f"\nTernary models: weights TTQ, activations BTQ; evaluation BTQ {btq_eval}" + (
        ", mean ± standard deviation over the evaluation seeds."
        if btq_eval == "stochastic"
        else "."
    )
    return "\n".join(lines) + "\n" + note + "\n"


def plot(
    histories: dict[str, dict[str, list[dict[str, float]]]], results: dict, path: Path
) -> None:
    cells = list(histories)
    figure, axes = plt.subplots(1, len(cells) + 1, figsize=(5 * (len(cells) + 1), 4.2))
    for axis, cell in zip(axes, cells, strict=False):
        # The ternary model continues from the FP checkpoint: draw it after the FP epochs.
        offset = {"fp": 0, "ternary": len(histories[cell]["fp"])}
        for kind, style in zip(KINDS, ("-", "--"), strict=True):
            rows = histories[cell][kind]
            axis.plot(
                [offset[kind] + r["epoch"] for r in rows],
                [r["val_ppl"] for r in rows],
                style,
                marker=".",
                label=f"{kind} (ours)",
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
        axis.legend(fontsize=8)
    bars = axes[-1]
    labels, ours, paper = [], [], []
    for cell in cells:
        for kind in KINDS:
            labels.append(f"{cell} {kind}")
            ours.append(results[cell][kind]["mean"])
            paper.append(PAPER[cell][kind])
    positions = range(len(labels))
    drawn = bars.bar([p - 0.2 for p in positions], ours, width=0.4, label="ours")
    bars.bar_label(drawn, fmt="%.1f", fontsize=7)
    bars.bar([p + 0.2 for p in positions], paper, width=0.4, label="paper")
    bars.set_xticks(list(positions), labels, rotation=20)
    bars.set(title="test perplexity (lower is better)", ylabel="perplexity")
    bars.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def evaluate_models(params: Params, runs_dir: Path, data_dir: Path) -> tuple[dict, dict]:
    """(test perplexity summaries, validation histories), by cell then kind."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    histories: dict[str, dict[str, list[dict[str, float]]]] = {}
    for cell in params.cells:
        results[cell], histories[cell] = {}, {}
        for kind in KINDS:
            model_dir = Path(runs_dir) / kind / cell
            print(f"report: testing {kind} {cell}", flush=True)
            recipe = params.recipe(kind, cell)
            perplexities = test_perplexities(
                model_dir / "model.ckpt", params, data_dir, recipe.limit_eval_batches
            )
            results[cell][kind] = summarize(perplexities)
            histories[cell][kind] = read_history(model_dir / "history.csv")
    return results, histories


def report(params: Params, runs_dir: Path, data_dir: Path, out_dir: Path) -> dict:
    used = params.model_dump(include={"cells", "report", "hardware"})
    with stage_run(params.tracking, "report", used) as run:
        results, histories = evaluate_models(params, runs_dir, data_dir)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {
            f"{cell}_{kind}_test_ppl": round(value["mean"], 3)
            for cell, kinds in results.items()
            for kind, value in kinds.items()
        }
        metrics |= {
            f"{cell}_ternary_test_ppl_std": round(kinds["ternary"]["std"], 3)
            for cell, kinds in results.items()
        }
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
        table = markdown_table(results, params.report.evaluation_mode(params.quant))
        (out_dir / "README.md").write_text(
            "# HitNet on PTB: test perplexity per word\n\n"
            + table
            + "\n![learning curves and test perplexities](curves.png)\n",
            encoding="utf-8",
        )
        plot(histories, results, out_dir / "curves.png")
        run.log_metrics(metrics, step=0)
        for name in ("README.md", "metrics.json", "curves.png"):
            run.log_artifact(out_dir / name, "report")
    print(table, flush=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--data", type=Path, default=Path("data/ptb"))
    parser.add_argument("--out", type=Path, default=Path("report"))
    args = parser.parse_args(argv)
    report(load_params(args.params), args.runs, args.data, args.out)


if __name__ == "__main__":
    main()
