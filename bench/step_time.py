"""Training-step time of the HitNet recurrent layers against torch's own LSTM / GRU.

Measures the median wall time of one training step (forward, cross-entropy, backward,
``clip_grad_norm_(0.25)``, SGD step) of a 1-layer word language model at batch 20, bptt 35,
embedding 300, hidden 300, vocab 10,000, on random token ids. For each cell it times:

  * ``torch.nn.LSTM`` / ``torch.nn.GRU`` (cuDNN on a GPU): the baseline;
  * the ``SlopedLSTM`` / ``SlopedGRU`` full-precision reference loop (quantization off,
    slopes 1, ``fused_full_precision=False``, so the Python per-step loop runs);
  * the ternary layer: TTQ weights, BTQ activations, sloping factors ``--slopes`` (default
    1, 1; the pipeline's LSTM trains at 2, 2 with ``slope_gradient: unit``, as here);
  * the compiled ternary layer, and the same distilled as the ternary stage trains it: a
    frozen full-precision teacher (torch's fused layer) runs forward in every step and the
    loss is 0.1 * cross-entropy + 0.9 * KL(teacher || model).

All variants share the same embedding / dropout 0.5 / decoder model (``RNNLanguageModel``);
the baseline only swaps its recurrent layer for a plain torch module. The hidden state is
carried, detached, from step to step as in training. On CUDA every step is bracketed by
``torch.cuda.synchronize()`` and the peak allocated memory is reported per variant.

Run from the repository root:

    python bench/step_time.py                      # cuda if available, else cpu
    python bench/step_time.py --device cpu --steps 10 --cells lstm --json step_time.json
    python bench/step_time.py --cells lstm --slopes 2,2    # the LSTM recipe's sloped cell
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness
from hitnet.language_model import (
    ModelConfig,
    RecurrentState,
    RNNLanguageModel,
    detach_state,
)
from hitnet.lightning_module import Distillation
from hitnet.quantizers import QuantConfig

VOCAB, BATCH, BPTT, HIDDEN, EMBEDDING = 10_000, 20, 35, 300, 300
LR, CLIP = 20.0, 0.25
DISTILL_WEIGHT = 0.9
TORCH_RNN: dict[str, type[nn.LSTM] | type[nn.GRU]] = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass(frozen=True)
class Slopes:
    """The ternary layer's sloping factors: sigmoid(sigma * x), tanh(tanh * x)."""

    sigma: float = 1.0
    tanh: float = 1.0

    def __str__(self) -> str:
        return f"{self.sigma:g}/{self.tanh:g}"


class TorchRecurrent(nn.Module):
    """A plain ``torch.nn.LSTM`` / ``GRU`` that takes (and ignores) the model's ``generator``."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.rnn = TORCH_RNN[cell](EMBEDDING, HIDDEN)

    def forward(
        self, input: Tensor, hx: RecurrentState | None = None, generator: object = None
    ) -> tuple[Tensor, RecurrentState]:
        return self.rnn(input, hx)


def build_fp_model(cell: str) -> RNNLanguageModel:
    """The full-precision model every variant starts from (on torch's fused layer)."""
    return RNNLanguageModel(ModelConfig(vocab_size=VOCAB, cell=cell, dropout=0.5))


def build_baseline(cell: str) -> RNNLanguageModel:
    model = build_fp_model(cell)
    model.recurrent = TorchRecurrent(cell)
    return model


def build_teacher(cell: str) -> RNNLanguageModel:
    """What the ternary stage distils from: the FP model, on torch's fused layer."""
    model = build_fp_model(cell)
    assert model.recurrent.uses_fused_kernel
    return model


def build_fp_loop(cell: str) -> RNNLanguageModel:
    model = build_fp_model(cell)
    model.recurrent.fused_full_precision = False
    assert not model.recurrent.uses_fused_kernel
    return model


def build_ternary(cell: str, slopes: Slopes) -> RNNLanguageModel:
    quant = QuantConfig(weight="ttq", activation="btq", slope_gradient="unit")
    config = ModelConfig(
        vocab_size=VOCAB,
        cell=cell,
        dropout=0.5,
        quant=quant,
        lambda_sigma=slopes.sigma,
        lambda_tanh=slopes.tanh,
    )
    model = RNNLanguageModel(config)
    assert not model.recurrent.uses_fused_kernel
    return model


def build_ternary_compiled(cell: str, slopes: Slopes, mode: str) -> RNNLanguageModel:
    model = build_ternary(cell, slopes)
    model.recurrent.compile_recurrence(mode)
    return model


Variant = tuple[str, Callable[[str], RNNLanguageModel], bool]  # name, build, distilled


def variants(cell: str, compile_mode: str, slopes: Slopes) -> list[Variant]:
    layer = "SlopedLSTM" if cell == "lstm" else "SlopedGRU"
    ternary = f"{layer} ternary" + ("" if slopes == Slopes() else f", slopes {slopes}")
    compiled = f"{ternary}, compiled {compile_mode}"

    def build_compiled(c: str) -> RNNLanguageModel:
        return build_ternary_compiled(c, slopes, compile_mode)

    return [
        (f"torch.nn.{cell.upper()}", build_baseline, False),
        (f"{layer} FP loop", build_fp_loop, False),
        (f"{ternary} (TTQ w, BTQ a)", lambda c: build_ternary(c, slopes), False),
        (compiled, build_compiled, False),
        (f"{compiled} + distillation", build_compiled, True),
    ]


@dataclass
class Result:
    cell: str
    variant: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    ratio: float
    peak_mib: float | None
    mem_ratio: float | None
    final_loss: float


def time_variant(
    model: RNNLanguageModel,
    device: torch.device,
    steps: int,
    warmup: int,
    distillation: Distillation | None = None,
) -> tuple[list[float], float | None, float]:
    """Per-step times in ms over ``steps`` timed steps, peak MiB (CUDA only), last loss."""
    model.to(device).train()
    if distillation is not None:
        distillation.start_epoch(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tokens = torch.randint(VOCAB, (BPTT + 1, BATCH), device=device)
    inputs, targets = tokens[:-1], tokens[1:].reshape(-1)
    state = model.initial_state(BATCH, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    loss = torch.zeros(())
    for step in range(warmup + steps):
        harness.sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits, state = model(inputs, state)
        state = detach_state(state)
        loss = F.cross_entropy(logits.view(-1, VOCAB), targets)
        if distillation is not None:
            soft = distillation.loss(inputs, logits)
            loss = (1 - DISTILL_WEIGHT) * loss + DISTILL_WEIGHT * soft
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        harness.sync(device)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return times, peak, loss.item()


def bench_cell(
    cell: str, device: torch.device, steps: int, warmup: int, compile_mode: str, slopes: Slopes
) -> list[Result]:
    results: list[Result] = []
    for variant, build, distilled in variants(cell, compile_mode, slopes):
        torch.manual_seed(0)
        model = build(cell)
        teacher = Distillation(build_teacher(cell), temperature=1.0) if distilled else None
        times, peak, final_loss = time_variant(model, device, steps, warmup, teacher)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        median, p10, p90 = harness.spread(times)
        base_ms = results[0].median_ms if results else median
        base_mib = results[0].peak_mib if results else peak
        results.append(
            Result(
                cell=cell,
                variant=variant,
                median_ms=median,
                p10_ms=p10,
                p90_ms=p90,
                ratio=median / base_ms,
                peak_mib=peak,
                mem_ratio=peak / base_mib if peak is not None and base_mib else None,
                final_loss=final_loss,
            )
        )
    return results


def print_table(cell: str, results: list[Result]) -> None:
    with_mem = results[0].peak_mib is not None
    width = max(len(r.variant) for r in results)
    header = f"{'variant':<{width}} {'median ms':>10} {'p10-p90 ms':>15} {'x base':>7}"
    if with_mem:
        header += f" {'peak MiB':>9} {'x base':>7}"
    print(f"\n[{cell}]  batch {BATCH}, bptt {BPTT}, hidden {HIDDEN}, vocab {VOCAB}")
    print(header)
    print("-" * len(header))
    for r in results:
        spread = f"{r.p10_ms:.2f}-{r.p90_ms:.2f}"
        row = f"{r.variant:<{width}} {r.median_ms:>10.2f} {spread:>15} {r.ratio:>7.2f}"
        if with_mem:
            row += f" {r.peak_mib:>9.1f} {r.mem_ratio:>7.2f}"
        print(row)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_device_option(parser)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (they include compiling)"
    )
    parser.add_argument("--cells", default="lstm,gru", help="comma-separated: lstm, gru")
    harness.add_json_option(parser)
    parser.add_argument(
        "--slopes", default="1,1", help="the ternary layer's lambda_sigma,lambda_tanh (default 1,1)"
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode of the compiled ternary variant "
        "(default: reduce-overhead on cuda, default on cpu)",
    )
    args = parser.parse_args(argv)
    args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = set(args.cells) - set(TORCH_RNN)
    if unknown or not args.cells:
        parser.error(f"--cells takes lstm and/or gru, got {args.cells}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("need --steps >= 1 and --warmup >= 0")
    try:
        sigma, tanh = (float(value) for value in args.slopes.split(","))
    except ValueError:  # not two values, or not numbers
        parser.error(f"--slopes takes lambda_sigma,lambda_tanh; got {args.slopes!r}")
    if min(sigma, tanh) <= 0:
        parser.error(f"--slopes must be positive, got {args.slopes!r}")
    args.slopes = Slopes(sigma, tanh)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    compile_mode = args.compile_mode or ("reduce-overhead" if device.type == "cuda" else "default")
    name = harness.device_name(device, cudnn=True)
    print(f"device: {name}")
    print(f"torch:  {torch.__version__}")
    print(f"steps:  {args.steps} timed after {args.warmup} warm-up, SGD lr {LR}, clip {CLIP}")
    results = []
    for cell in args.cells:
        cell_results = bench_cell(cell, device, args.steps, args.warmup, compile_mode, args.slopes)
        print_table(cell, cell_results)
        results.extend(cell_results)
    if args.json is not None:
        harness.write_report(
            args.json,
            name,
            results,
            rows_key="results",
            steps=args.steps,
            warmup=args.warmup,
            slopes=asdict(args.slopes),
            shape={
                "batch": BATCH,
                "bptt": BPTT,
                "embedding": EMBEDDING,
                "hidden": HIDDEN,
                "vocab": VOCAB,
            },
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
