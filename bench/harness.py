"""What the timing benchmarks share: their common options, the device they name, the spread
of their step times and the JSON report that ``--json`` writes.

The scripts are run as files (``python bench/step_time.py``); each puts the repository root on
``sys.path`` first, so that ``bench`` is importable as a namespace package.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch


def add_device_option(parser: argparse.ArgumentParser) -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"default: {default}")


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the rows here")


def device_name(device: torch.device, *, cudnn: bool = False) -> str:
    """The GPU's name (with cuDNN's version if asked), or the CPU with torch's thread count."""
    if device.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device)
    return f"{name} (cuDNN {torch.backends.cudnn.version()})" if cudnn else name


def sync(device: torch.device) -> None:
    """Waits for the GPU's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(
    times: list[float], method: Literal["exclusive", "inclusive"] = "exclusive"
) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of ``times``; one time is all three."""
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10, method=method) if len(times) > 1 else [median] * 9
    return median, deciles[0], deciles[-1]


def write_report(
    path: Path, device: str, rows: Sequence[Any], rows_key: str = "rows", **settings: Any
) -> None:
    """The JSON report: the device, torch's version, the run's settings, then its rows (one
    dataclass a measurement)."""
    report = {
        "device": device,
        "torch": torch.__version__,
        **settings,
        rows_key: [asdict(row) for row in rows],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
