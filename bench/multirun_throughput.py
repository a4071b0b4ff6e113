"""Multi-run throughput: trial-epochs per minute of R ternary runs stacked in one model and one
forward / backward (``hitnet.stacked_model``), against one single run measured in the same
execution.

One training step as the ternary stage takes it: forward, cross-entropy plus distillation
from a frozen full-precision teacher (0.1 * CE + 0.9 * KL; ``--no-distill``: CE alone),
backward, gradient-norm clipping at 0.25 (per run), SGD (per-run lr). Random token ids, the
hidden state carried and detached from step to step. Three modes:

  * ``single``: one ``RNNLanguageModel``, the baseline (ratios are against it);
  * ``stacked``: R runs in one ``StackedLanguageModel``, each drawing its noise from its own
    generator (the mode that equals R separate runs, tests/hitnet/test_multirun.py);
  * ``processes``: R single runs in R processes sharing the device (what concurrent stages
    or sweep trials do), each timed from a common start once all have compiled and warmed up;
    the row pools every process's step times.

Trial-epochs per minute = R * 60 / (median step seconds * ``--epoch-steps``), by default 1327
steps, one PTB epoch at batch 20, bptt 35. The model is the recipe's (params.yaml): TTQ
weights, BTQ activations, slopes 2/2 for the LSTM; embedding = hidden.

Run from the repository root:

    python bench/multirun_throughput.py                       # cuda if available
    python bench/multirun_throughput.py --cell gru --runs 1 6 --json multirun.json
    python bench/multirun_throughput.py --device cpu --hidden 32 --vocab 200 --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness
from hitnet.language_model import ModelConfig, RNNLanguageModel, detach_state
from hitnet.lightning_module import Distillation
from hitnet.multirun import StackedSGD, clip_grad_norm_per_run_, per_run_training_loss
from hitnet.quantizers import QuantConfig
from hitnet.stacked_model import StackedLanguageModel

LR, CLIP, DISTILL_WEIGHT = 10.0, 0.25, 0.9
# the ternary recipe of params.yaml, per cell: quantization, slopes, dropout, temperature
RECIPE = {
    "lstm": {"slopes": 2.0, "threshold": 0.5, "dropout": 0.25, "temperature": 1.0},
    "gru": {"slopes": 1.0, "threshold": 0.5, "dropout": 0.2, "temperature": 2.0},
}


@dataclass
class Row:
    mode: str
    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    step_ratio: float  # median step time over the single run's
    epochs_per_min: float  # trial-epochs per minute
    throughput_ratio: float  # trial-epochs per minute over the single run's
    peak_mib: float | None
    final_loss: float


def model_config(args: argparse.Namespace) -> ModelConfig:
    recipe = RECIPE[args.cell]
    quant = QuantConfig(
        weight="ttq", activation="btq", ttq_threshold=recipe["threshold"], slope_gradient="unit"
    )
    return ModelConfig(
        vocab_size=args.vocab,
        cell=args.cell,
        embedding_size=args.hidden,
        hidden_size=args.hidden,
        dropout=recipe["dropout"],
        quant=quant,
        lambda_sigma=recipe["slopes"],
        lambda_tanh=recipe["slopes"],
    )


def build_models(
    config: ModelConfig, runs: int, device: torch.device, compile_mode: str | None
) -> list[RNNLanguageModel]:
    # every shape (single, each R) is its own graph of the compiled recurrence
    torch._dynamo.config.recompile_limit = 64
    models = []
    for seed in range(runs):
        torch.manual_seed(seed)
        model = RNNLanguageModel(config).to(device).train()
        model.recurrent.compile_recurrence(compile_mode)
        models.append(model)
    return models


def teacher_for(
    config: ModelConfig, args: argparse.Namespace, device: torch.device
) -> Distillation | None:
    """A fresh Distillation (its own carried state) from the FP model, or None."""
    if not args.distill:
        return None
    torch.manual_seed(100)
    teacher = RNNLanguageModel(config.full_precision())
    distillation = Distillation(teacher, RECIPE[args.cell]["temperature"])
    distillation.start_epoch(device)
    return distillation


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # inputs, targets -> loss


def single_step(model: RNNLanguageModel, distillation: Distillation | None) -> Step:
    """One run's training step, as LanguageModelTask and Lightning's clipping take it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    state = None

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal state
        optimizer.zero_grad(set_to_none=True)
        logits, state = model(inputs, state)
        state = detach_state(state)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        if distillation is not None:
            soft = distillation.loss(inputs, logits)
            loss = (1 - DISTILL_WEIGHT) * loss + DISTILL_WEIGHT * soft
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return loss.detach()

    return step


def stacked_step(
    model: StackedLanguageModel, distillation: Distillation | None, device: torch.device
) -> Step:
    optimizer = StackedSGD(model.parameters(), lr=torch.full((model.runs,), LR, device=device))
    generators = [torch.Generator(device=device).manual_seed(run) for run in range(model.runs)]
    state = None

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal state
        optimizer.zero_grad(set_to_none=True)
        logits, state = model(inputs, state, generators)
        state = detach_state(state)
        loss, _ = per_run_training_loss(logits, inputs, targets, distillation, DISTILL_WEIGHT)
        loss.sum().backward()
        clip_grad_norm_per_run_(model.parameters(), CLIP)
        optimizer.step()
        return loss.detach().mean()

    return step


def time_steps(
    steps: list[Step],
    args: argparse.Namespace,
    device: torch.device,
    before_timing: Callable[[], Any] | None = None,
) -> tuple[list[float], float | None, float]:
    """ms per round of ``steps`` (each called once per round), peak MiB (CUDA), last loss;
    ``before_timing`` is called once the warm-up rounds are done."""
    tokens = torch.randint(args.vocab, (args.bptt + 1, args.batch), device=device)
    inputs, targets = tokens[:-1], tokens[1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], torch.zeros(())
    for round_ in range(args.warmup + args.steps):
        harness.sync(device)
        if round_ == args.warmup and before_timing is not None:
            before_timing()
        start = time.perf_counter()
        for step in steps:
            loss = step(inputs, targets)
        harness.sync(device)
        if round_ >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return times, peak, float(loss)


def time_one_process(
    rank: int, args: argparse.Namespace, start: Any, results: Any
) -> None:  # a spawned process: one single run, timed once every process is ready
    device = torch.device(args.device)
    config = model_config(args)
    (model,) = build_models(config, 1, device, args.compile_mode)
    step = single_step(model, teacher_for(config, args, device))
    results.put(time_steps([step], args, device, before_timing=start.wait))


def time_processes(runs: int, args: argparse.Namespace) -> tuple[list[float], float | None, float]:
    """Every process's step times pooled, the largest peak MiB, a last loss."""
    context = mp.get_context("spawn")  # CUDA cannot be forked
    start, results = context.Barrier(runs), context.SimpleQueue()
    processes = [
        context.Process(target=time_one_process, args=(rank, args, start, results))
        for rank in range(runs)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get() for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a timing process exited with {process.exitcode}")
    peaks = [peak for _, peak, _ in outcomes if peak is not None]
    times = [time for process_times, _, _ in outcomes for time in process_times]
    return times, max(peaks) if peaks else None, outcomes[-1][2]


def measure(
    mode: str, runs: int, args: argparse.Namespace, device: torch.device, base: Row | None
) -> Row:
    if mode == "processes":
        times, peak, loss = time_processes(runs, args)
    else:
        config = model_config(args)
        models = build_models(config, runs, device, args.compile_mode)
        if mode == "stacked":
            stacked = StackedLanguageModel(models)
            steps = [stacked_step(stacked, teacher_for(config, args, device), device)]
        else:
            steps = [single_step(models[0], teacher_for(config, args, device))]
        times, peak, loss = time_steps(steps, args, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    median, p10, p90 = harness.spread(times, method="inclusive")
    epochs_per_min = runs * 60e3 / (median * args.epoch_steps)
    return Row(
        mode=mode,
        runs=runs,
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        step_ratio=median / base.median_ms if base else 1.0,
        epochs_per_min=epochs_per_min,
        throughput_ratio=epochs_per_min / base.epochs_per_min if base else 1.0,
        peak_mib=peak,
        final_loss=loss,
    )


def table(rows: list[Row], device: str) -> str:
    lines = [
        f"multi-run throughput on {device}: ratios to 1 single run of the same execution",
        "",
        "| mode | runs | median step ms | x single step | trial-epochs/min | x single |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.mode} | {row.runs} | {row.median_ms:.2f} | {row.step_ratio:.2f}x "
            f"| {row.epochs_per_min:.2f} | {row.throughput_ratio:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_device_option(parser)
    parser.add_argument("--cell", choices=sorted(RECIPE), default="lstm")
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4, 6, 8, 16])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiling)")
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "none", "default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode of the recurrence; auto: reduce-overhead on cuda, none on cpu",
    )
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["stacked", "processes"],
        default=["stacked", "processes"],
        help="what R runs are timed as, against one single run",
    )
    parser.add_argument("--hidden", type=int, default=300, help="hidden = embedding size")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--epoch-steps", type=int, default=1327, help="steps in one epoch")
    harness.add_json_option(parser)
    args = parser.parse_args(argv)
    sizes = (args.steps, args.hidden, args.vocab, args.batch, args.bptt, args.epoch_steps)
    if min(sizes) < 1 or args.warmup < 0 or min(args.runs) < 1:
        parser.error("need --steps, --runs, sizes and --epoch-steps >= 1 and --warmup >= 0")
    cuda = args.device.startswith("cuda")
    if args.compile == "auto":
        args.compile_mode = "reduce-overhead" if cuda else None
    else:
        args.compile_mode = None if args.compile == "none" else args.compile
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    name = harness.device_name(device)
    print(f"device {name}, torch {torch.__version__}, {args.cell}, compile {args.compile_mode}")
    base = measure("single", 1, args, device, None)
    rows = [base]
    for runs in args.runs:
        for mode in args.modes:
            rows.append(measure(mode, runs, args, device, base))
            print(json.dumps(asdict(rows[-1])), flush=True)
    print(table(rows, name))
    if args.json:
        harness.write_report(
            args.json,
            name,
            rows,
            cell=args.cell,
            compile=args.compile_mode,
            distill=args.distill,
            shape={k: getattr(args, k) for k in ("hidden", "vocab", "batch", "bptt")},
            steps=args.steps,
            warmup=args.warmup,
            epoch_steps=args.epoch_steps,
        )


if __name__ == "__main__":
    main()
