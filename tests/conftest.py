"""Shared fixtures: the real PTB files live in ../shared/data/ptb beside the repository."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PTB_DIR = REPO_ROOT.parent / "shared" / "data" / "ptb"


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    if not (PTB_DIR / "ptb.train.txt").is_file():
        pytest.fail(f"PTB not found at {PTB_DIR}: tests read it from ../shared/data/ptb")
    return PTB_DIR
