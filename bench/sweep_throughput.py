"""Sweep throughput: trial-epochs per minute with 1, 2, 4, 8, 16 concurrent Tune trials on one GPU.

Runs the tune stage's own trainable (``pipeline.tune.build_tuner``: ternary model, Optuna,
ASHA, ``tune.with_resources``) once per concurrency level N, all levels in one Ray session:
N trials at once, each with ``1/N`` of the GPU (0 on a CPU-only machine) and one CPU, each
training ``--epochs`` epochs (ASHA's grace period is set to the whole budget, so no trial is
stopped early and every level does the same work per trial). Two numbers per level:

  * wall: trial-epochs finished over the wall time of ``Tuner.fit``, start-up and the
    first epoch's compiling included;
  * steady: N trials over the median time of one epoch after the first, i.e. the rate once
    every trial is compiled and running.

Ratios are against the 1-trial level of the same run. The model starts from fresh weights
(or ``--init``): throughput does not depend on them.

Run from the repository root, after ``dvc repro prepare`` (or point ``--data`` at PTB):

    python bench/sweep_throughput.py --params params.yaml --data data/ptb --cell lstm
    python bench/sweep_throughput.py --levels 1 2 --epochs 2 --limit-train-batches 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness
from pipeline.builders import build_task, datamodule_for
from pipeline.params import Params, load_params
from pipeline.tune import build_tuner, connect_ray


def level_params(params: Params, trials: int, args: argparse.Namespace, storage: Path) -> Params:
    """The sweep settings for one level: ``trials`` at once, each a 1/trials share of the GPU."""
    tune = params.tune.model_copy(
        update={
            "num_samples": trials,
            "max_concurrent": trials,
            "epochs": args.epochs,
            "grace_period": args.epochs,
            "cpus_per_trial": 1.0,
            "gpus_per_trial": 1.0 / trials if torch.cuda.is_available() else 0.0,
            "max_failures": 0,
            "limit_train_batches": args.limit_train_batches,
            "limit_eval_batches": args.limit_eval_batches,
            "storage": str(storage),
            "fail_at_epoch": None,
        }
    )
    tracking = params.tracking.model_copy(update={"enabled": False})
    return params.model_copy(update={"tune": tune, "tracking": tracking})


def fresh_checkpoint(params: Params, cell: str, data_dir: Path, folder: Path) -> Path:
    datamodule = datamodule_for(params, data_dir)
    task = build_task(params, cell, "ternary", datamodule.vocab_size)
    path = folder / "init.ckpt"
    torch.save({"state_dict": task.state_dict()}, path)
    return path


def measure_level(
    params: Params, cell: str, data_dir: Path, init: Path, trials: int
) -> dict[str, float]:
    # every trial sampled (no configured first trial): the throughput is the same either way
    tuner = build_tuner(params, cell, data_dir, init, name=f"throughput-{trials}", start=None)
    start = time.perf_counter()
    results = tuner.fit()
    wall_s = time.perf_counter() - start
    errors = [str(result.error) for result in results if result.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {trials} trials failed; first: {errors[0]}")
    epoch_times, steady_times = [], []
    for result in results:
        times = result.metrics_dataframe["time_this_iter_s"].tolist()
        epoch_times += times
        steady_times += times[1:]  # the first epoch also compiles
    steady_s = statistics.median(steady_times) if steady_times else float("nan")
    return {
        "trials": trials,
        "trial_epochs": len(epoch_times),
        "wall_s": wall_s,
        "wall_epochs_per_min": 60.0 * len(epoch_times) / wall_s,
        "steady_epoch_s": steady_s,
        "steady_epochs_per_min": 60.0 * trials / steady_s,
    }


def table(rows: list[dict[str, float]], device: str) -> str:
    base = rows[0]
    lines = [
        f"sweep throughput on {device}: trial-epochs per minute (ratio to 1 trial, same run)",
        "",
        "| concurrent trials | GPU per trial | wall | steady | median epoch |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        share = f"1/{row['trials']}" if device != "cpu" else "0"
        wall = row["wall_epochs_per_min"]
        steady = row["steady_epochs_per_min"]
        lines.append(
            f"| {row['trials']} | {share} "
            f"| {wall:.2f} ({wall / base['wall_epochs_per_min']:.2f}x) "
            f"| {steady:.2f} ({steady / base['steady_epochs_per_min']:.2f}x) "
            f"| {row['steady_epoch_s']:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/ptb"))
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--init", type=Path, help="FP checkpoint; default: fresh weights")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--epochs", type=int, default=3, help="per trial; at least 2")
    parser.add_argument("--limit-train-batches", type=int)
    parser.add_argument("--limit-eval-batches", type=int)
    harness.add_json_option(parser)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the steady rate skips each trial's first")

    import ray

    params = load_params(args.params)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        init = args.init or fresh_checkpoint(params, args.cell, args.data, Path(folder))
        connect_ray()
        try:
            for trials in args.levels:
                level = level_params(params, trials, args, Path(folder) / "ray_results")
                rows.append(measure_level(level, args.cell, args.data, init, trials))
                print(json.dumps(rows[-1]), flush=True)
                if args.json:  # after every level: a run cut short keeps what it measured
                    args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))
        finally:
            ray.shutdown()
    report = table(rows, device)
    print(report)


if __name__ == "__main__":
    main()
