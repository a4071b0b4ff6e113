"""Stage `study@cell`: the paper's analysis of its quantizers on one cell, from the FP model.

- **Table.** Test PPW with UQ (2-bit by default), TTQ or BTQ on the recurrent weights only or
  on the activations only (slopes 1), and with the HitNet hybrid as ``quant`` configures it:
  each with no training (the FP weights quantized) and after a short quantization-aware
  fine-tune, the same for every row (the cell's ``train_ternary`` recipe cut to
  ``study.epochs``; the model of its last epoch is tested). The FP model and the paper's
  numbers beside them.
- **Distributions.** Histograms of the FP model's W_ih, W_hh and of its gate, candidate and
  hidden activations over ``study.record_batches`` validation windows, each studied
  quantizer's levels drawn on top and its mean squared error in the legend.
- **Sloping-factor ablation.** For each lambda of ``study.lambdas`` (both slopes), the
  hybrid's fraction of activations within ``study.polarized_within`` of -1, 0 or 1, BTQ's
  mean squared error on them, and its test PPW, with no training and after the fine-tune.

Writes ``study/<cell>/``: ``README.md`` (the tables), ``metrics.json``, ``distributions.png``
and ``ablation.png``; one MLflow run holds them. Every evaluated quantization is kept in
``checkpoints/study-<cell>-<fingerprint>/rows.json`` as it finishes, so a killed stage reruns
only the rest (in the same MLflow run).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch

from hitnet.analysis import (
    GROUP_RANGES,
    STUDIED_QUANTIZERS,
    ActivationStatistics,
    StudiedQuantizer,
    histogram,
    pooled,
    quantizer_levels,
    record_activations,
    squared_error,
)
from hitnet.data import PTBDataModule
from hitnet.language_model import CellType
from hitnet.lightning_module import LanguageModelTask
from hitnet.quantizers import QuantConfig
from pipeline.builders import (
    build_task,
    build_trainer,
    compile_as_configured,
    datamodule_for,
    evaluation_trainer,
    fingerprint,
    model_dir,
    start_from_fp,
)
from pipeline.cli import cell_stage_parser, run_command
from pipeline.paper import PAPER
from pipeline.params import Params, QuantParams, load_params
from pipeline.tracking import resumable_stage_run

TARGETS = ("weights", "activations")
WEIGHTS = ("W_ih", "W_hh")
COLORS = {"uq": "tab:orange", "ttq": "tab:green", "btq": "tab:red"}


@dataclass(frozen=True)
class Row:
    """One quantization the study evaluates: its metrics key, its label and its settings."""

    key: str
    label: str
    quant: QuantParams


def quantizer_name(kind: StudiedQuantizer, quant: QuantParams) -> str:
    return f"UQ-{quant.uq_bits}bit" if kind == "uq" else kind.upper()


def table_rows(params: Params, cell: CellType) -> list[Row]:
    """Each studied quantizer on the recurrent weights only, then on the activations only
    (slopes 1, embedding and decoder FP), then the hybrid as ``quant`` configures the cell."""
    configured = params.quant.for_cell(cell)
    plain = configured.model_copy(
        update={"lambda_sigma": 1.0, "lambda_tanh": 1.0, "ternary_embedding_decoder": False}
    )
    rows = []
    for target in TARGETS:
        for kind in STUDIED_QUANTIZERS:
            quant = plain.model_copy(
                update={
                    "weight": kind if target == "weights" else "none",
                    "activation": kind if target == "activations" else "none",
                }
            )
            rows.append(
                Row(f"{target}_{kind}", f"{quantizer_name(kind, plain)}, {target} only", quant)
            )
    hybrid = (
        f"HitNet hybrid: {configured.weight.upper()} weights, {configured.activation.upper()} "
        f"activations, slopes {configured.lambda_sigma:g} / {configured.lambda_tanh:g}"
    )
    return [*rows, Row("hybrid", hybrid, configured)]


def ablation_rows(params: Params, cell: CellType) -> list[Row]:
    """The hybrid with both sloping factors set to each of ``study.lambdas``."""
    configured = params.quant.for_cell(cell)
    return [
        Row(
            f"lambda_{slope:g}",
            f"lambda {slope:g}",
            configured.model_copy(update={"lambda_sigma": slope, "lambda_tanh": slope}),
        )
        for slope in params.study.lambdas
    ]


def study_recipe(params: Params, cell: CellType) -> Params:
    """``params`` whose ternary recipe for ``cell`` is the study's short fine-tune."""
    study = params.study
    recipe = params.recipe("ternary", cell).model_copy(
        update={
            "epochs": study.epochs,
            "limit_train_batches": study.limit_train_batches,
            "limit_eval_batches": study.limit_eval_batches,
        }
    )
    return params.model_copy(update={"train_ternary": recipe})


def activation_summary(statistics: dict[str, ActivationStatistics]) -> dict[str, float]:
    total = pooled(statistics)
    return {"polarized": total.polarized_fraction, "btq_mse": total.mse("btq")}


class Study:
    """One cell's models, all from its FP checkpoint: tested, recorded and fine-tuned."""

    def __init__(
        self,
        params: Params,
        cell: CellType,
        datamodule: PTBDataModule,
        fp_checkpoint: Path,
        work_dir: Path,
    ) -> None:
        self.params = study_recipe(params, cell)
        self.cell = cell
        self.datamodule = datamodule
        self.fp_checkpoint = fp_checkpoint
        self.work_dir = work_dir
        self.done_file = work_dir / "rows.json"
        self.done: dict[str, dict[str, float]] = (
            json.loads(self.done_file.read_text()) if self.done_file.is_file() else {}
        )

    def task(self, quant: QuantParams | None) -> LanguageModelTask:
        """The FP model (``quant`` None) or a ternary one with ``quant``, with the FP weights."""
        params = self.params if quant is None else self.params.model_copy(update={"quant": quant})
        kind = "fp" if quant is None else "ternary"
        task = build_task(params, self.cell, kind, self.datamodule.vocab_size)
        start_from_fp(task, self.fp_checkpoint, load_weights=True)
        compile_as_configured(task, params.hardware)
        return task

    def test_ppl(self, task: LanguageModelTask) -> float:
        pl.seed_everything(self.params.seed, verbose=False)  # BTQ weights draw from it
        trainer = evaluation_trainer(self.params, self.params.study.limit_eval_batches)
        (result,) = trainer.test(task, self.datamodule, verbose=False)
        return float(result["test_ppl"])

    def record(
        self, task: LanguageModelTask, config: QuantConfig
    ) -> dict[str, ActivationStatistics]:
        study = self.params.study
        windows = itertools.islice(self.datamodule.val_dataloader(), study.record_batches)
        return record_activations(
            task.model,
            windows,
            study.histogram_bins,
            study.polarized_within,
            config,
            seed=self.params.seed,
        )

    def evaluate(self, row: Row) -> dict[str, float]:
        """Test PPW and activation statistics of ``row`` with no training and fine-tuned;
        each distinct quantization once (the hybrid may be one of the ablation's)."""
        key = json.dumps(row.quant.model_dump(), sort_keys=True)
        if key in self.done:
            return self.done[key]
        started = time.monotonic()
        task = self.task(row.quant)
        config = row.quant.to_config()
        result = {"ptq_ppl": self.test_ppl(task)}
        result |= {f"{k}_ptq": v for k, v in activation_summary(self.record(task, config)).items()}
        pl.seed_everything(self.params.seed, verbose=False)  # every row: the same data, draws
        recipe = self.params.recipe("ternary", self.cell)
        # no checkpoints: a killed row is trained again (rows.json keeps the finished ones)
        build_trainer(self.params, recipe, self.work_dir / row.key, []).fit(task, self.datamodule)
        result["qat_ppl"] = self.test_ppl(task)
        result |= {f"{k}_qat": v for k, v in activation_summary(self.record(task, config)).items()}
        self.done[key] = result
        self._save_done()
        print(
            f"study@{self.cell}: {row.label}: test PPW {result['ptq_ppl']:.2f} with no training,"
            f" {result['qat_ppl']:.2f} fine-tuned ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
        return result

    def _save_done(self) -> None:
        staged = self.done_file.with_suffix(".tmp")
        staged.write_text(json.dumps(self.done, indent=1))
        os.replace(staged, self.done_file)  # a kill never leaves half a file

    def distributions(self, fp: LanguageModelTask) -> dict[str, dict[str, Any]]:
        """Per tensor of the FP model: histogram, bin edges, each quantizer's levels and MSE."""
        config = self.params.quant.for_cell(self.cell).to_config()
        bins = self.params.study.histogram_bins
        tensors: dict[str, dict[str, Any]] = {}
        recurrent = fp.model.recurrent
        for name, weight in zip(
            WEIGHTS, (recurrent.weight_ih_l0, recurrent.weight_hh_l0), strict=True
        ):
            weight = weight.detach().cpu()
            bound = float(weight.abs().max())
            tensors[name] = {
                "histogram": histogram(weight, bins, -bound, bound),
                "range": (-bound, bound),
                "levels": {
                    k: quantizer_levels(weight, k, config, True) for k in STUDIED_QUANTIZERS
                },
                "mse": {
                    k: float(squared_error(weight, k, config, True).mean())
                    for k in STUDIED_QUANTIZERS
                },
            }
        for group, stats in self.record(fp, config).items():
            tensors[group] = {
                "histogram": stats.histogram,
                "range": GROUP_RANGES[group],
                "levels": {
                    k: quantizer_levels(torch.zeros(1), k, config, False)
                    for k in STUDIED_QUANTIZERS
                },
                "mse": {k: stats.mse(k) for k in STUDIED_QUANTIZERS},
            }
        return tensors


def run_study(study: Study, params: Params, cell: CellType) -> tuple[dict, dict]:
    """(metrics, the FP model's distributions) of one cell."""
    fp = study.task(None)
    fp_ppl = study.test_ppl(fp)
    print(f"study@{cell}: FP model: test PPW {fp_ppl:.2f}", flush=True)
    distributions = study.distributions(fp)
    table = {row.key: study.evaluate(row) for row in table_rows(params, cell)}
    ablation = {row.key: study.evaluate(row) for row in ablation_rows(params, cell)}
    metrics = {
        "fp": {"test_ppl": fp_ppl, "paper": PAPER[cell]["fp"]},
        "table": table,
        "ablation": ablation,
        "mse": {name: tensor["mse"] for name, tensor in distributions.items()},
        "finetune_epochs": params.study.epochs,
    }
    metrics["table"]["hybrid"] = {**table["hybrid"], "paper": PAPER[cell]["ternary"]}
    return metrics, distributions


def markdown(metrics: dict[str, Any], params: Params, cell: CellType) -> str:
    """The study's tables: quantizers, sloping factors, quantization errors."""
    epochs = metrics["finetune_epochs"]
    quant = params.quant.for_cell(cell)
    labels = {row.key: row.label for row in table_rows(params, cell)}
    lines = [
        f"| {cell.upper()}: quantized | test PPW, no training | test PPW, after a {epochs}-epoch "
        "fine-tune | paper |",
        "|---|---|---|---|",
        f"| nothing (FP) | {metrics['fp']['test_ppl']:.2f} | | {metrics['fp']['paper']} |",
    ]
    for key, result in metrics["table"].items():
        paper = f"{result['paper']} (fully trained)" if "paper" in result else ""
        lines.append(
            f"| {labels[key]} | {result['ptq_ppl']:.2f} | {result['qat_ppl']:.2f} | {paper} |"
        )
    within = params.study.polarized_within
    lines += [
        "",
        f"| {cell.upper()} hybrid: lambda | activations within {within:g} of -1/0/1, no "
        "training -> fine-tuned | BTQ MSE, no training -> fine-tuned | test PPW, no training "
        "| test PPW, fine-tuned |",
        "|---|---|---|---|---|",
    ]
    for key, result in metrics["ablation"].items():
        lines.append(
            f"| {key.removeprefix('lambda_')} | {result['polarized_ptq']:.3f} -> "
            f"{result['polarized_qat']:.3f} | {result['btq_mse_ptq']:.4f} -> "
            f"{result['btq_mse_qat']:.4f} | {result['ptq_ppl']:.2f} | {result['qat_ppl']:.2f} |"
        )
    names = [quantizer_name(kind, quant) for kind in STUDIED_QUANTIZERS]
    lines += ["", f"| {cell.upper()} FP model: MSE of | {' | '.join(names)} |"]
    lines.append("|---|" + "---|" * len(names))
    for tensor, errors in metrics["mse"].items():
        values = " | ".join(f"{errors[kind]:.4g}" for kind in STUDIED_QUANTIZERS)
        lines.append(f"| {tensor} | {values} |")
    windows = params.study.limit_eval_batches or "all"
    note = (
        f"\nTest PPW on {windows} test windows. Fine-tune: the cell's train_ternary recipe "
        f"(lr, dropout, distillation) for {epochs} epoch(s) from the FP weights, the same "
        "for every row; the paper's "
        "hybrid is fully trained (this project's is in the report stage). Weights: UQ and BTQ "
        "on the weights clipped to [-1, 1], unscaled; TTQ scaled by alpha (threshold "
        f"{quant.ttq_threshold:g}). Activations unscaled. BTQ at test: activations "
        f"{'rounded' if quant.btq_eval == 'deterministic' else 'drawn (seeded)'}, weights "
        "drawn (seeded). BTQ's MSE is its expectation over the draws. Activations are "
        f"recorded over {params.study.record_batches} validation windows, before quantization.\n"
    )
    return "\n".join(lines) + "\n" + note


def plot_distributions(tensors: dict[str, dict[str, Any]], quant: QuantParams, path: Path) -> None:
    figure, axes = plt.subplots(1, len(tensors), figsize=(4.2 * len(tensors), 3.6))
    for axis, (name, tensor) in zip(axes, tensors.items(), strict=True):
        low, high = tensor["range"]
        counts = tensor["histogram"].numpy()
        edges = torch.linspace(low, high, len(counts) + 1).numpy()
        axis.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.5)
        for offset, kind in enumerate(STUDIED_QUANTIZERS):
            levels = tensor["levels"][kind]
            label = f"{quantizer_name(kind, quant)}: MSE {tensor['mse'][kind]:.3g}"
            for index, level in enumerate(levels):
                axis.axvline(
                    level,
                    color=COLORS[kind],
                    linestyle=("-", "--", ":")[offset],
                    linewidth=1.2,
                    label=label if index == 0 else None,
                )
        every = [low, high, *itertools.chain.from_iterable(tensor["levels"].values())]
        margin = 0.05 * (max(every) - min(every))
        axis.set(
            title=name,
            xlim=(min(every) - margin, max(every) + margin),
            yscale="log",
            xlabel="value",
        )
        axis.legend(fontsize=7)
    axes[0].set_ylabel("count")
    figure.suptitle("FP model: distributions and each quantizer's levels")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ablation(ablation: dict[str, dict[str, float]], within: float, path: Path) -> None:
    slopes = [float(key.removeprefix("lambda_")) for key in ablation]
    results = list(ablation.values())
    panels = (
        ("polarized", f"fraction within {within:g} of -1, 0, 1"),
        ("btq_mse", "BTQ mean squared error"),
        ("ppl", "test PPW"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for axis, (name, title) in zip(axes, panels, strict=True):
        for stage, label in (("ptq", "no training"), ("qat", "fine-tuned")):
            key = f"{stage}_ppl" if name == "ppl" else f"{name}_{stage}"
            axis.plot(slopes, [r[key] for r in results], marker="o", label=label)
        axis.set(title=title, xlabel="sloping factor lambda", xscale="log")
        axis.set_xticks(slopes, [f"{s:g}" for s in slopes])
        axis.legend(fontsize=8)
    axes[-1].set_yscale("log")
    figure.suptitle("hybrid: sloping factor (lambda_sigma = lambda_tanh = lambda)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def flat_metrics(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"table": {"hybrid": {"qat_ppl": x}}}`` -> ``{"table.hybrid.qat_ppl": x}``."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flat_metrics(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def used_params(params: Params, cell: CellType) -> dict:
    """What the study depends on (dvc.yaml's params of the stage; the resume fingerprint)."""
    include = {"seed", "data", "model", "quant", "train_ternary", "study", "hardware"}
    return params.used_by_cell(include, cell)


def study(
    params: Params,
    cell: CellType,
    data_dir: Path,
    fp_checkpoint: Path,
    out_dir: Path,
    work_root: Path = Path("checkpoints"),
) -> dict[str, Any]:
    if not Path(fp_checkpoint).is_file():
        raise FileNotFoundError(f"{fp_checkpoint}: no FP model there (stage train_fp@{cell})")
    used = used_params(params, cell)
    work_dir = Path(work_root) / f"study-{cell}-{fingerprint(used, fp_checkpoint)}"
    work_dir.mkdir(parents=True, exist_ok=True)
    name = f"study@{cell}"
    with resumable_stage_run(
        params.tracking, name, {**used, "cell": cell}, work_dir / "mlflow_run_id"
    ) as run:
        datamodule = datamodule_for(params, data_dir)
        runner = Study(params, cell, datamodule, Path(fp_checkpoint), work_dir)
        metrics, distributions = run_study(runner, params, cell)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", "utf-8")
        table = markdown(metrics, params, cell)
        (out_dir / "README.md").write_text(
            f"# Quantizer study: {cell.upper()} on PTB\n\n{table}\n"
            "![distributions](distributions.png)\n\n![sloping factor](ablation.png)\n",
            encoding="utf-8",
        )
        plot_distributions(
            distributions, params.quant.for_cell(cell), out_dir / "distributions.png"
        )
        plot_ablation(metrics["ablation"], params.study.polarized_within, out_dir / "ablation.png")
        run.log_metrics(flat_metrics(metrics), step=0)
        run.flush()
        for artifact in ("README.md", "metrics.json", "distributions.png", "ablation.png"):
            run.log_artifact(out_dir / artifact, "study")
    shutil.rmtree(work_dir, ignore_errors=True)  # finished and recorded
    print(table, flush=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = cell_stage_parser(__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where the FP model is")
    parser.add_argument("--out", type=Path, help="default: study/<cell>")
    args = parser.parse_args(argv)
    fp_checkpoint = model_dir("fp", args.cell, runs=args.runs) / "model.ckpt"
    out = args.out or Path("study") / args.cell
    study(load_params(args.params), args.cell, args.data, fp_checkpoint, out)


if __name__ == "__main__":
    run_command(main)
