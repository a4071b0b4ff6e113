"""The stages' command lines: a mistake in their input ends in one clear line, not a traceback,
and the libraries' chatter that is not the user's business stays out of the log.

What a user can fix (a params key, a data file, the tracking server, a run that diverged) is
printed as ``error: <message>`` on stderr, and the command exits with status 2. Anything else
is a bug and keeps its traceback; so does every error when ``HITNET_TRACEBACK=1``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from hitnet.data import CorpusError
from hitnet.lightning_module import TrainingDiverged
from pipeline.params import ParamsError
from pipeline.tracking import TrackingError

USER_ERRORS = (ParamsError, CorpusError, TrackingError, TrainingDiverged, FileNotFoundError)


# Messages of the libraries that say nothing a user of these stages acts on.
QUIET_WARNINGS = (
    r".*does not have many workers.*",  # PTB windows come from memory, one process does
    r".*Checkpoint directory .* exists and is not empty.*",  # a resumed run's own folder
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def cell_stage_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a stage run once a cell, described by its module docstring's first
    line: the cell, ``--params`` and ``--data``; the stage adds its own options."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("cell", choices=["lstm", "gru"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/ptb"))
    return parser


def quiet_libraries() -> None:
    """Lightning's info lines (hardware found, tips, restoring) go; its warnings stay."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def run_command(main: Callable[[], None]) -> None:
    quiet_libraries()
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get("HITNET_TRACEBACK") == "1":
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
