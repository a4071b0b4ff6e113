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

``--gpus 1 2 4 8`` measures instead how a sweep scales over the GPUs of one host: per count G,
a local Ray of G GPUs and ``--trials-per-gpu`` K trials on each (the stage's
``gpus_per_trial: auto`` with ``max_concurrent: K``: G x K trials at once, 1/K GPU each), against
G = 1 in the same run. On a CPU-only machine Ray is given G fake GPUs and the trials train on
the CPU (a smoke test of the wiring, not a measurement).

Run from the repository root, after ``dvc repro prepare`` (or point ``--data`` at PTB):

    python bench/sweep_throughput.py --params params.yaml --data data/ptb --cell lstm
    python bench/sweep_throughput.py --levels 1 2 --epochs 2 --limit-train-batches 20
    python bench/sweep_throughput.py --gpus 1 2 4 8 --trials-per-gpu 8 --json gpus.json
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


def gpu_count_params(
    params: Params, gpus: int, per_gpu: int, args: argparse.Namespace, storage: Path
) -> Params:
    """``per_gpu`` trials on each of ``gpus`` GPUs, as the stage shares them out (auto)."""
    level = level_params(params, gpus * per_gpu, args, storage)
    tune = level.tune.model_copy(update={"max_concurrent": per_gpu, "gpus_per_trial": "auto"})
    return level.model_copy(update={"tune": tune})


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


def table(rows: list[dict[str, float]], device: str, over_gpus: bool) -> str:
    """Per concurrency level (``over_gpus``: per GPU count), the rates and their ratios."""
    base = rows[0]
    if over_gpus:
        title, first = "over GPU counts (ratio to 1 GPU)", "| GPUs | trials at once |"
    else:
        title, first = "(ratio to 1 trial, same run)", "| concurrent trials | GPU per trial |"
    lines = [
        f"sweep throughput on {device}: trial-epochs per minute {title}",
        "",
        f"{first} wall | steady | median epoch |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if over_gpus:
            level = f"| {row['gpus']} | {row['trials']} "
        else:
            share = f"1/{row['trials']}" if device != "cpu" else "0"
            level = f"| {row['trials']} | {share} "
        wall, steady = row["wall_epochs_per_min"], row["steady_epochs_per_min"]
        lines.append(
            f"{level}| {wall:.2f} ({wall / base['wall_epochs_per_min']:.2f}x) "
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
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU counts to scale over")
    parser.add_argument("--trials-per-gpu", type=int, default=8, help="with --gpus")
    harness.add_json_option(parser)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the steady rate skips each trial's first")
    if min(args.gpus or [1]) < 1 or args.trials_per_gpu < 1:
        parser.error("--gpus and --trials-per-gpu must be at least 1")

    import ray

    params = load_params(args.params)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []

    def keep(row: dict[str, float]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every level: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory() as folder:
        init = args.init or fresh_checkpoint(params, args.cell, args.data, Path(folder))
        storage = Path(folder) / "ray_results"
        if args.gpus:
            for gpus in args.gpus:  # a Ray of its own per count: it owns the first G GPUs
                level = gpu_count_params(params, gpus, args.trials_per_gpu, args, storage)
                connect_ray(num_gpus=gpus)
                try:
                    trials = gpus * args.trials_per_gpu
                    keep({"gpus": gpus, **measure_level(level, args.cell, args.data, init, trials)})
                finally:
                    ray.shutdown()
        else:
            connect_ray()
            try:
                for trials in args.levels:
                    level = level_params(params, trials, args, storage)
                    keep(measure_level(level, args.cell, args.data, init, trials))
            finally:
                ray.shutdown()
    print(table(rows, device, over_gpus=bool(args.gpus)))


if __name__ == "__main__":
    main()
