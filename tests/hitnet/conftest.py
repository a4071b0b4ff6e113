"""Shared by the method library's tests."""

import pytorch_lightning as pl


def cpu_trainer(**kwargs) -> pl.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints, bar, summary or sanity check); ``kwargs``
    add to or override those settings."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**defaults, **kwargs})
