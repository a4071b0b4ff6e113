"""Per-epoch perplexities: a CSV rewritten after every epoch (DVC plots read it) and a line
of progress a person can follow (epoch, perplexities, lr, time per epoch, ETA).

The rows live in the callback's state, which Lightning stores in each checkpoint, so a
resumed run rewrites the file with the epochs before the interruption included.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

HISTORY_COLUMNS = ("epoch", "train_ppl", "val_ppl", "lr")


class EpochHistory(Callback):
    """Appends a row at every train-epoch end (``train_ppl`` and ``lr`` are logged from the
    epoch's last batch, ``val_ppl`` by validation, so all are there by then)."""

    def __init__(
        self,
        path: Path,
        name: str,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.log_metrics = log_metrics  # e.g. MLflow, after the CSV is safely written
        self.rows: list[dict[str, float]] = []
        self._epoch_started = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed after its last epoch (killed while testing, say) trains no epoch:
        # its restored rows must reach the CSV all the same (DVC deleted it before the rerun).
        if self.rows:
            self.write()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch + 1}
        for key in HISTORY_COLUMNS[1:]:
            row[key] = float(metrics[key]) if key in metrics else math.nan
        self.rows.append(row)
        self.write()
        if self.log_metrics is not None:
            self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])
        seconds = time.monotonic() - self._epoch_started
        eta_min = seconds * (trainer.max_epochs - row["epoch"]) / 60
        print(
            f"{self.name} epoch {row['epoch']}/{trainer.max_epochs}  train_ppl "
            f"{row['train_ppl']:.2f}  val_ppl {row['val_ppl']:.2f}  lr {row['lr']:g}  "
            f"{seconds:.1f} s/epoch  ETA {eta_min:.1f} min",
            flush=True,
        )

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict["rows"])


def read_history(path: Path) -> list[dict[str, float]]:
    """The rows an ``EpochHistory`` wrote, as numbers."""
    with Path(path).open(encoding="utf-8") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]
