"""What a sweep trial pays to compile: the first training step of a ternary model with the
compiled recurrence, each setting in a fresh process (as Ray starts trials), all sharing one
new torch.compile cache folder. The first setting compiles cold; the others differ only in
their slopes and TTQ threshold, as a sweep's trials do, and find its graph in the cache.

    python bench/compile_cache.py --settings 2:0.5 1.5:0.6 3:0.9 [--cell gru] [--mode default]

Each row: the first step's wall time (compiling included), its ratio to the cold first row,
and the median of the later steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import add_device_option, add_json_option, device_name, sync, write_report
from bench.step_time import Slopes, build_ternary


@dataclass
class Row:
    slope: float
    ttq_threshold: float
    first_step_s: float
    ratio: float  # first step over the cold first row's
    median_ms: float  # the later steps


def one_process(cell: str, slope: float, threshold: float, mode: str, device: str, steps: int):
    """In this process: the first step's seconds and the later steps' median, as JSON."""
    torch.manual_seed(0)
    model = build_ternary(cell, Slopes(slope, slope)).to(device)
    model.recurrent.quant = replace(model.recurrent.quant, ttq_threshold=threshold)
    model.recurrent.compile_recurrence(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    tokens = torch.randint(0, model.config.vocab_size, (35, 20), device=device)
    times = []
    for _ in range(steps):
        sync(torch.device(device))
        start = time.perf_counter()
        optimizer.zero_grad()
        model(tokens)[0].float().square().mean().backward()
        optimizer.step()
        sync(torch.device(device))
        times.append(time.perf_counter() - start)
    print(json.dumps({"first": times[0], "median": statistics.median(times[1:])}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["2:0.5", "1.5:0.6", "3:0.9"],
        help="slope:ttq_threshold per process; the first compiles cold",
    )
    parser.add_argument("--mode", default=None, help="compile mode (default: the pipeline's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=2, type=float, help=argparse.SUPPRESS)  # a child's
    add_device_option(parser)
    add_json_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the pipeline's modes (HardwareParams.compile auto): CUDA graphs on a GPU, inductor here
    mode = args.mode or ("reduce-overhead" if args.device.startswith("cuda") else "default")
    if args.one:
        one_process(args.cell, *args.one, mode, args.device, args.steps)
        return
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for setting in args.settings:
            slope, threshold = (float(value) for value in setting.split(":"))
            child = [sys.executable, __file__, "--cell", args.cell, "--mode", mode]
            child += ["--device", args.device, "--steps", str(args.steps)]
            done = subprocess.run(
                [*child, "--one", str(slope), str(threshold)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            cold = rows[0].first_step_s if rows else measured["first"]
            rows.append(
                Row(
                    slope,
                    threshold,
                    round(measured["first"], 2),
                    round(measured["first"] / cold, 3),
                    round(1000 * measured["median"], 2),
                )
            )
            print(
                f"slope {slope:g}, threshold {threshold:g}: first step {measured['first']:.1f} s "
                f"({rows[-1].ratio:.2f}x the cold one), then {rows[-1].median_ms:.2f} ms",
                flush=True,
            )
    device = device_name(torch.device(args.device))
    print(f"device: {device}, {args.cell}, compile mode {mode}, torch {torch.__version__}")
    if args.json:
        write_report(args.json, device, rows, cell=args.cell, mode=mode, steps=args.steps)


if __name__ == "__main__":
    main()
