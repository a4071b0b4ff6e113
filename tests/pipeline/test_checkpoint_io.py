"""Checkpoints survive a full disk: the stage's Trainer never leaves a truncated one."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.builders import build_trainer
from pipeline.params import Params
from tests.pipeline.conftest import SMOKE

GOOD = {"weights": torch.arange(100_000, dtype=torch.float32), "epoch": 1}
NEWER = {"weights": torch.zeros(100_000), "epoch": 2}


def _checkpoint_io(tmp_path: Path):
    params = Params.model_validate(SMOKE)
    return build_trainer(params, params.recipe("fp", "lstm"), tmp_path, []).strategy.checkpoint_io


def _full_disk_half_way(source, destination, *, follow_symlinks=True):
    """shutil's file copy when the disk fills up: part of the bytes, then ENOSPC."""
    Path(destination).write_bytes(Path(source).read_bytes()[: 1 << 16])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_on_another_filesystem_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Fault: staged in the temp folder of another filesystem, the move became a copy, and
    ENOSPC mid-copy left last.ckpt truncated."""
    checkpoint_io, last = _checkpoint_io(tmp_path), tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint(GOOD, last)

    def other_filesystem(source, destination):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", other_filesystem)
    monkeypatch.setattr(shutil, "copyfile", _full_disk_half_way)
    with contextlib.suppress(OSError):  # failing is fine; breaking the last one is not
        checkpoint_io.save_checkpoint(NEWER, last)
    monkeypatch.undo()

    assert torch.load(last, weights_only=True)["epoch"] in (1, 2)  # whole, old or new
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]  # no staged leftovers


def test_a_full_disk_while_writing_beside_it_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    checkpoint_io, last = _checkpoint_io(tmp_path), tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint(GOOD, last)

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.save_checkpoint(NEWER, last)
    monkeypatch.undo()

    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert [path.name for path in tmp_path.iterdir()] == ["last.ckpt"]
    checkpoint_io.save_checkpoint(NEWER, last)  # and the next save goes through
    assert torch.load(last, weights_only=True)["epoch"] == 2
