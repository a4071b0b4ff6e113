"""Stages `train_fp@cell` and `train_ternary@cell`: train one language model on PTB.

Outputs in ``out_dir``: ``model.ckpt`` (the best-validation checkpoint), ``metrics.json``
(train/val/test perplexity) and ``history.csv`` (one row an epoch). A ternary model starts
from the matching full-precision checkpoint (``--init``).

Resumable: checkpoints go to ``checkpoints/<stage>-<fingerprint>/`` after every epoch,
keyed by a fingerprint of everything the run depends on; rerunning the same stage after a
kill continues from the last one instead of starting over.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from hitnet.data import SPLIT_FILES
from hitnet.language_model import CellType
from pipeline.builders import (
    Kind,
    build_task,
    build_trainer,
    compile_as_configured,
    datamodule_for,
    fingerprint,
    model_dir,
    start_from_fp,
)
from pipeline.cli import run_command
from pipeline.history import EpochHistory, read_history
from pipeline.model_registry import registered_name
from pipeline.params import (
    Params,
    ParamsError,
    load_params,
    load_searched,
)
from pipeline.tracking import resumable_stage_run


def stage_name(kind: Kind, cell: CellType, seed: int | None = None) -> str:
    """DVC's name of the stage: ``train_fp@lstm``, or per training seed ``train_ternary@lstm-1``."""
    return f"train_{kind}@{cell}" + ("" if seed is None else f"-{seed}")


def used_params(params: Params, kind: Kind, cell: CellType) -> dict:
    """The params a training depends on (what DVC tracks for the stage, and what is hashed)."""
    sections = {"seed", "data", "model", "hardware", f"train_{kind}"}
    return params.used_by_cell(sections | ({"quant"} if kind == "ternary" else set()), cell)


def train(
    params: Params,
    cell: CellType,
    kind: Kind,
    data_dir: Path,
    out_dir: Path,
    init_from: Path | None = None,
    work_root: Path = Path("checkpoints"),
    seed: int | None = None,
) -> dict[str, float | str]:
    """Trains (or resumes) one model, tests its best checkpoint, writes ``out_dir``.

    ``seed``, when given, replaces ``params.seed``: one of ``training_seeds``."""
    if seed is not None:
        params = params.model_copy(update={"seed": seed})
    name = stage_name(kind, cell, seed)
    if init_from is not None and not Path(init_from).is_file():
        raise FileNotFoundError(f"--init {init_from}: no full-precision checkpoint there")
    if init_from is None and params.recipe(kind, cell).distill_weight > 0:
        raise ParamsError(f"{name}: distill_weight > 0 needs the FP model to distil from (--init)")
    used = used_params(params, kind, cell)
    work_dir = Path(work_root) / f"{name.replace('@', '-')}-{fingerprint(used, init_from)}"
    last = work_dir / "last.ckpt"
    resuming = last.is_file()

    with resumable_stage_run(
        params.tracking,
        name,
        {**used, "cell": cell, "init_from": str(init_from)},
        work_dir / "mlflow_run_id",
    ) as run:
        if resuming:
            print(f"{name}: resuming from {last} (MLflow run {run.run_id})", flush=True)
        else:
            run.log_dataset({split: Path(data_dir) / f for split, f in SPLIT_FILES.items()})
        metrics = _fit_and_test(
            params,
            cell,
            kind,
            data_dir,
            Path(out_dir),
            work_dir,
            init_from=init_from,
            resuming=resuming,
            log_metrics=run.log_metrics,
            name=name,
        )
        # Every epoch of the CSV once more: what a server outage kept from MLflow goes there
        # now (the steps it already has are skipped).
        for row in read_history(Path(out_dir) / "history.csv"):
            epoch = int(row.pop("epoch"))
            run.log_metrics(row, step=epoch)
        run.log_metrics({"test_ppl": metrics["test_ppl"]}, step=metrics["epochs"])
        run.flush()  # a server still down: an error naming it; the checkpoints stay
        for artifact in ("metrics.json", "history.csv"):
            run.log_artifact(Path(out_dir) / artifact)
        run.log_registered_model(
            Path(out_dir) / "model.ckpt",
            registered_name(kind, cell),
            {
                "seed": str(params.seed),
                "btq_eval": "rounded",  # how the served model evaluates (served_model.py)
                "val_ppl": f"{metrics['val_ppl']:.4f}",
                "test_ppl": f"{metrics['test_ppl']:.4f}",
                "dvc.stage": name,
            },
        )
    # Only a finished and recorded run lets go of its checkpoints.
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{name}: test_ppl {metrics['test_ppl']:.2f} (best val_ppl {metrics['val_ppl']:.2f})")
    return metrics


def _fit_and_test(
    params: Params,
    cell: CellType,
    kind: Kind,
    data_dir: Path,
    out_dir: Path,
    work_dir: Path,
    init_from: Path | None,
    resuming: bool,
    log_metrics: Callable[[dict[str, float], int], None],
    name: str,
) -> dict[str, float | str]:
    """Fits from scratch, from ``init_from`` or, resuming, from ``work_dir/last.ckpt``;
    writes out_dir."""
    recipe = params.recipe(kind, cell)
    pl.seed_everything(params.seed, workers=True)
    datamodule = datamodule_for(params, data_dir)
    task = build_task(params, cell, kind, datamodule.vocab_size)
    if init_from is not None:
        start_from_fp(task, init_from, load_weights=not resuming)
    compile_as_configured(task, params.hardware)

    history = EpochHistory(out_dir / "history.csv", name, log_metrics)
    best = ModelCheckpoint(
        dirpath=work_dir, filename="best", monitor="val_ppl", mode="min", save_last=True
    )
    last = work_dir / "last.ckpt"
    # Lightning runs Checkpoint callbacks (best) after the others at epoch end: each
    # checkpoint holds the history rows up to its own epoch.
    trainer = build_trainer(params, recipe, work_dir, [history, best])
    trainer.fit(task, datamodule, ckpt_path=last if last.is_file() else None)
    metrics = {
        "train_ppl": history.rows[-1]["train_ppl"],
        "val_ppl": float(best.best_model_score),
        "epochs": len(history.rows),
    }
    # Testing restores the best checkpoint, callback states included: read history first.
    (test,) = trainer.test(task, datamodule, ckpt_path=best.best_model_path, verbose=False)
    metrics["test_ppl"] = float(test["test_ppl"])
    quant = task.model.config.quant
    if quant.needs_noise:  # which evaluation val and test used: named where they are read
        metrics["btq_eval"] = "rounded" if quant.btq_eval == "deterministic" else "drawn"

    out_dir.mkdir(parents=True, exist_ok=True)
    export_model(Path(best.best_model_path), out_dir / "model.ckpt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def export_model(checkpoint: Path, destination: Path) -> None:
    """The stage's model file: the best checkpoint, less the weights an averaged run would
    resume training from (its state_dict already holds the averaged model) and the
    callbacks' states, which hold absolute paths: the same model is the same bytes in every
    clone, so DVC sees one hash."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for training_only in ("current_model_state", "averaging_state", "callbacks"):
        saved.pop(training_only, None)
    torch.save(saved, destination)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["fp", "ternary"])
    parser.add_argument("cell", choices=["lstm", "gru"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/ptb"))
    parser.add_argument(
        "--seed", type=int, help="training seed (default: params.yaml's seed); one model each"
    )
    parser.add_argument(
        "--out", type=Path, help="default: runs/<kind>/<cell>, or runs/<kind>/<cell>/seed<N>"
    )
    parser.add_argument("--init", type=Path, help="full-precision model.ckpt to start from")
    parser.add_argument("--best", type=Path, help="a sweep's best.json: its values win")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.best is not None:
        params = params.with_searched(load_searched(args.best))
    out = args.out or model_dir(args.kind, args.cell, args.seed)
    train(params, args.cell, args.kind, args.data, out, init_from=args.init, seed=args.seed)


if __name__ == "__main__":
    run_command(main)
