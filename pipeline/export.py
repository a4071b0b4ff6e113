"""Stage `export@cell`: the cell's ternary model as one file to deploy, and what it weighs.

Of the cell's ternary models (one per training seed) it exports the one with the best
validation perplexity (chosen on validation, never on test) to ``runs/export/<cell>/
model.hitnet`` (``hitnet.packed``: 2-bit codes, scales, the FP rest, the vocabulary). Then it
checks the file: the model rebuilt from it alone must give the checkpoint's test perplexity,
BTQ rounded. ``size.json``: the chosen seed, both test perplexities, and the file's bytes,
whole and by part, against the same parameters in FP32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from hitnet.language_model import CellType, RNNLanguageModel
from hitnet.lightning_module import LanguageModelTask
from hitnet.packed import file_sizes, load_packed, save_packed
from pipeline.builders import compile_as_configured, datamodule_for, model_dir
from pipeline.cli import cell_stage_parser, run_command
from pipeline.params import Params, load_params
from pipeline.tracking import stage_run

FILE_NAME = "model.hitnet"
# The rebuilt model runs the checkpoint's float32 operations on the same values: equal
# perplexities (tests/hitnet/test_packed.py checks the logits bit for bit). The tolerance
# only lets a GPU's kernels sum in another order; more than that is another model.
SAME_PPL_RELATIVE = 1e-6


def best_seed(params: Params, cell: CellType, runs: Path) -> tuple[int, dict[int, float]]:
    """The training seed whose model has the lowest best-validation perplexity (the first
    such seed on a tie), and every seed's; a model not trained yet is an error naming it."""
    val_ppl = {}
    for seed in params.training_seeds:
        folder = model_dir("ternary", cell, seed, runs)
        for name in ("model.ckpt", "metrics.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name}: no trained ternary model there (run `dvc repro "
                    f"train_ternary@{cell}-{seed}` first)"
                )
        val_ppl[seed] = float(json.loads((folder / "metrics.json").read_text())["val_ppl"])
    return min(val_ppl, key=val_ppl.__getitem__), val_ppl


def rounded_test_ppl(
    model: RNNLanguageModel, params: Params, cell: CellType, datamodule: pl.LightningDataModule
) -> float:
    """Test perplexity with BTQ rounded, the recurrence compiled as every stage compiles it."""
    task = LanguageModelTask(model.config.evaluated_as("deterministic"))
    task.model.load_state_dict(model.state_dict())
    task.model.recurrent.fused_full_precision = model.recurrent.fused_full_precision
    compile_as_configured(task, params.hardware)
    trainer = pl.Trainer(
        **params.hardware.trainer_kwargs(),
        limit_test_batches=params.recipe("ternary", cell).limit_eval_batches,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (result,) = trainer.test(task, datamodule, verbose=False)
    return float(result["test_ppl"])


def export(params: Params, cell: CellType, runs: Path, data_dir: Path, out_dir: Path) -> dict:
    # before any work: a model not trained yet, or no data, stops here
    seed, val_ppl = best_seed(params, cell, runs)
    datamodule = datamodule_for(params, data_dir)
    datamodule.setup()
    used = params.model_dump(include={"training_seeds", "data", "hardware"})
    with stage_run(params.tracking, f"export@{cell}", {**used, "cell": cell}) as run:
        checkpoint = model_dir("ternary", cell, seed, runs) / "model.ckpt"
        print(f"export@{cell}: training seed {seed} (best val_ppl {val_ppl[seed]:.2f})")
        trained = LanguageModelTask.load_from_checkpoint(checkpoint, map_location="cpu").model
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / FILE_NAME
        save_packed(trained, datamodule.corpus.vocab, path)
        from_checkpoint = rounded_test_ppl(trained, params, cell, datamodule)
        from_file = rounded_test_ppl(load_packed(path).model, params, cell, datamodule)
        if not math.isclose(from_file, from_checkpoint, rel_tol=SAME_PPL_RELATIVE):
            raise RuntimeError(  # a bug of the format or the loader, not of the user's input
                f"{path} scores test PPW {from_file}, its checkpoint {from_checkpoint}"
            )
        sizes: dict[str, Any] = {
            "seed": seed,
            "val_ppl": {str(s): value for s, value in val_ppl.items()},
            "test_ppl_rounded": {"checkpoint": from_checkpoint, "file": from_file},
            **file_sizes(path),
        }
        (out_dir / "size.json").write_text(json.dumps(sizes, indent=2) + "\n", encoding="utf-8")
        run.log_metrics(
            {
                "test_ppl_rounded": from_file,
                "file_bytes": sizes["file_bytes"],
                "fp32_ratio": sizes["ratio"],
                "recurrent_weights_fp32_ratio": sizes["recurrent_weights_ratio"],
            },
            step=0,
        )
        for name in (FILE_NAME, "size.json"):
            run.log_artifact(out_dir / name)
    print(
        f"export@{cell}: {path}, {sizes['file_bytes']:,} bytes (FP32 parameters: "
        f"{sizes['fp32_bytes']:,}; recurrent weights {sizes['recurrent_weights_ratio']}x "
        f"smaller); test_ppl {from_file:.2f}, BTQ rounded, as its checkpoint"
    )
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = cell_stage_parser(__doc__)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, help="default: runs/export/<cell>")
    args = parser.parse_args(argv)
    out = args.out or args.runs / "export" / args.cell
    export(load_params(args.params), args.cell, args.runs, args.data, out)


if __name__ == "__main__":
    run_command(main)
