"""Checkpoints written so that a crash or a full disk never leaves a broken one behind.

Lightning's own save (``TorchCheckpointIO``) writes through fsspec's transaction, which stages
the file in the system temp folder and moves it over the old one. When that folder is on
another filesystem the move is a copy, and a full disk mid-copy left a truncated
``last.ckpt`` that every rerun then failed to read. Here the new checkpoint goes to a
temporary file beside the old one, is flushed to disk, then replaces it in one rename: the
previous checkpoint stays whole until the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staged, path)  # atomic within one filesystem
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise
