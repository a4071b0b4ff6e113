"""CPU scoring speed of a packed ternary model against the FP32 model, from one harness.

Two tables, every figure against a baseline measured in the same run:

  * **Scoring**: tokens a second of scoring text (forward pass, BTQ rounded, the state carried
    across windows of ``--bptt`` tokens, no gradient) at each ``--batches`` size, for
    - the FP32 model on torch's fused LSTM / GRU: the baseline;
    - the same FP32 model through the HitNet reference loop (one Python step a token):
      what the loop itself costs;
    - the ternary model rebuilt from its packed file (``hitnet.packed.load_packed``), whose
      matmuls are FP32 matmuls on ternary values.
  * **Recurrent matmul** ``W_hh h`` (4H x H for the LSTM, 3H x H for the GRU) with W and h
    both ternary, as in a HitNet step, at each batch size:
    - FP32 dense (``F.linear`` on the ternary values, what the model runs): the baseline;
    - int8 GEMM on the codes (``torch._int_mm``; int32 sums, exact), then one scale;
    - additions and subtractions only: for each row, the sum of h over its +1 columns minus
      the sum over its -1 columns (index gathers);
    - a sparse CSR matrix of the codes (only the nonzero codes are touched).

The model is the file ``--model`` (an export stage's ``model.hitnet``), or else a random model of
the paper's size (1x300, vocabulary 10,000; ``--ternary-embedding-decoder``: those ternary too)
saved and loaded through the same format: neither speed nor size depends on training. Token ids
are random.

Run from the repository root:

    python bench/cpu_inference.py                                   # both cells, random 1x300
    python bench/cpu_inference.py --model runs/export/lstm/model.hitnet --batches 1
    python bench/cpu_inference.py --json cpu_inference.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness
from hitnet.data import Vocabulary
from hitnet.language_model import ModelConfig, RNNLanguageModel
from hitnet.packed import file_sizes, load_packed, save_packed
from hitnet.quantizers import QuantConfig

# The pipeline's setting (params.yaml): TTQ weights at threshold 0.5, BTQ activations rounded
TERNARY = QuantConfig(weight="ttq", activation="btq", btq_eval="deterministic", ttq_threshold=0.5)


@dataclass
class Row:
    table: str
    cell: str
    batch: int
    variant: str
    median_ms: float
    tokens_per_s: float | None
    ratio: float  # median time / the baseline's, same table, cell and batch


def timed(runs: list[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median wall milliseconds of each of ``runs`` over ``repeats`` calls after ``warmup``.

    The runs take turns, one call each a round: a busy machine then slows every variant
    alike, and the ratios between them hold."""
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, measured in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            measured.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(measured) for measured in times]


def random_packed_file(
    cell: str, folder: Path, vocab: int, hidden: int, ternary_embedding_decoder: bool
) -> Path:
    """A random ternary model of this size, saved in the packed format."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=vocab,
        cell=cell,
        embedding_size=hidden,
        hidden_size=hidden,
        quant=TERNARY,
        ternary_embedding_decoder=ternary_embedding_decoder,
    )
    path = folder / f"{cell}.hitnet"
    words = Vocabulary([f"w{i}" for i in range(vocab)])
    save_packed(RNNLanguageModel(config).eval(), words, path)
    return path


def scorer(model: RNNLanguageModel, batch: int, bptt: int) -> Callable[[], object]:
    """One window's scoring: logits and the carried state, as evaluation runs it."""
    vocab = model.config.vocab_size
    tokens = torch.randint(vocab, (bptt, batch), generator=torch.Generator().manual_seed(0))
    state = [model.initial_state(batch)]

    def score() -> Tensor:
        with torch.no_grad():
            logits, state[0] = model(tokens, state[0])
        return logits

    return score


def scoring_rows(path: Path, batches: list[int], bptt: int, repeats: int, warmup: int) -> list[Row]:
    packed = load_packed(path)
    fp_config = packed.config.full_precision()
    torch.manual_seed(0)
    fp = RNNLanguageModel(fp_config).eval()
    fp_loop = RNNLanguageModel(fp_config).eval()
    fp_loop.load_state_dict(fp.state_dict())
    fp_loop.recurrent.fused_full_precision = False
    cell = fp_config.cell
    variants = [
        (f"FP32 torch.nn.{cell.upper()} (fused)", fp),
        ("FP32, HitNet reference loop", fp_loop),
        ("ternary from the packed file", packed.model),
    ]
    rows = []
    for batch in batches:
        runs = [scorer(model, batch, bptt) for _, model in variants]
        medians = timed(runs, repeats, warmup)
        for (name, _), ms in zip(variants, medians, strict=True):
            tokens = batch * bptt / (ms / 1e3)
            rows.append(Row("scoring", cell, batch, name, ms, tokens, ms / medians[0]))
    return rows


Multiply = Callable[[Tensor], Tensor]


def matmul_variants(weight: Tensor, scale: Tensor) -> list[tuple[str, Multiply]]:
    """Ways to compute ``h @ weight.T``, ``weight = scale * codes`` (one scale a row), with
    ternary ``codes`` and a ternary h."""
    codes = torch.sign(weight).to(torch.int8)
    dense = weight.float()
    codes_t = codes.t().contiguous()
    cols = codes.size(1)
    positive = [torch.nonzero(row == 1).flatten() for row in codes]
    negative = [torch.nonzero(row == -1).flatten() for row in codes]
    width = max(len(index) for index in positive + negative)

    def padded(indices: list[Tensor]) -> Tensor:  # column ``cols`` reads a zero
        return torch.stack([F.pad(index, (0, width - len(index)), value=cols) for index in indices])

    plus, minus = padded(positive), padded(negative)
    sparse = codes.float().to_sparse_csr()

    def int8_gemm(h: Tensor) -> Tensor:
        return scale * torch._int_mm(h.to(torch.int8), codes_t)  # int32 sums: exact

    def add_subtract(h: Tensor) -> Tensor:
        extended = torch.cat([h, h.new_zeros(h.size(0), 1)], dim=1)
        return scale * (extended[:, plus].sum(-1) - extended[:, minus].sum(-1))

    return [
        ("FP32 dense (what the model runs)", lambda h: F.linear(h, dense)),
        ("int8 GEMM on the codes (torch._int_mm)", int8_gemm),
        ("additions/subtractions (index gathers)", add_subtract),
        ("sparse CSR of the codes", lambda h: (sparse @ h.t()).t() * scale),
    ]


def matmul_rows(path: Path, batches: list[int], repeats: int, warmup: int) -> list[Row]:
    packed = load_packed(path)
    weight = packed.model.recurrent.weight_hh_l0.detach()
    scale = weight.abs().amax(dim=1)  # a row's scale: the matrix's, or its own (ttq_per_row)
    rows = []
    for batch in batches:
        h = torch.randint(-1, 2, (batch, weight.size(1))).float()  # ternary, as BTQ leaves it
        reference = F.linear(h, weight)
        variants = matmul_variants(weight, scale)
        for name, multiply in variants:
            if not torch.allclose(multiply(h), reference, atol=1e-5):
                raise AssertionError(f"{name} does not compute W_hh h")
        runs = [lambda f=multiply, h=h: f(h) for _, multiply in variants]
        medians = timed(runs, repeats * 20, warmup)
        for (name, _), ms in zip(variants, medians, strict=True):
            rows.append(Row("matmul", packed.config.cell, batch, name, ms, None, ms / medians[0]))
    return rows


def print_tables(rows: list[Row], sizes: dict[str, dict], bptt: int) -> None:
    for cell, size in sizes.items():
        print(
            f"\n[{cell}] file {size['file_bytes']:,} bytes, FP32 parameters "
            f"{size['fp32_bytes']:,} bytes; recurrent weights {size['recurrent_weights_ratio']}x "
            "smaller"
        )
        for table, unit in (("scoring", f"windows of {bptt} tokens"), ("matmul", "W_hh h")):
            chosen = [row for row in rows if row.cell == cell and row.table == table]
            width = max(len(row.variant) for row in chosen)
            print(f"\n{table} ({unit})")
            header = f"{'batch':>5} {'variant':<{width}} {'median ms':>10} {'x base':>7}"
            header += f" {'tokens/s':>10}" if table == "scoring" else ""
            print(header)
            print("-" * len(header))
            for row in chosen:
                line = f"{row.batch:>5} {row.variant:<{width}} {row.median_ms:>10.4f} "
                line += f"{row.ratio:>7.2f}"
                if row.tokens_per_s is not None:
                    line += f" {row.tokens_per_s:>10,.0f}"
                print(line)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a packed model.hitnet (default: random)")
    parser.add_argument("--cells", default="lstm,gru", help="random models: lstm and/or gru")
    parser.add_argument("--hidden", type=int, default=300, help="random models: 1 x hidden")
    parser.add_argument("--vocab", type=int, default=10_000, help="random models' vocabulary")
    parser.add_argument(
        "--ternary-embedding-decoder",
        action="store_true",
        help="random models: embedding and decoder ternary too",
    )
    parser.add_argument("--batches", default="1,10", help="batch sizes, comma-separated")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--repeats", type=int, default=20, help="timed windows per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    harness.add_json_option(parser)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.cells = [c for c in args.cells.split(",") if c]
    if set(args.cells) - {"lstm", "gru"} or min(args.batches) < 1 or args.repeats < 1:
        parser.error("--cells takes lstm and/or gru; batches and repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = harness.device_name(torch.device("cpu"))
    print(f"device: {device}, torch {torch.__version__}")
    print(
        f"timing: median of {args.repeats} windows after {args.warmup}, variants taking turns "
        "(matmul: 20x more calls)"
    )
    with tempfile.TemporaryDirectory() as folder:
        if args.model is not None:
            paths = [args.model]
        else:
            paths = [
                random_packed_file(
                    cell, Path(folder), args.vocab, args.hidden, args.ternary_embedding_decoder
                )
                for cell in args.cells
            ]
        rows, sizes = [], {}
        for path in paths:
            cell = load_packed(path).config.cell
            sizes[cell] = file_sizes(path)
            rows += scoring_rows(path, args.batches, args.bptt, args.repeats, args.warmup)
            rows += matmul_rows(path, args.batches, args.repeats, args.warmup)
    print_tables(rows, sizes, args.bptt)
    if args.json is not None:
        harness.write_report(args.json, device, rows, bptt=args.bptt, sizes=sizes)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
