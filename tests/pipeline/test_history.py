"""EpochHistory: a row per epoch in the CSV, and the rows in every checkpoint for resume."""

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from hitnet.data import PTBDataModule
from hitnet.language_model import ModelConfig
from hitnet.lightning_module import LanguageModelTask
from pipeline.history import EpochHistory, read_history


def test_each_epochs_row_is_complete_and_in_that_epochs_checkpoint(tmp_path: Path, ptb_dir):
    datamodule = PTBDataModule(ptb_dir, batch_size=5, eval_batch_size=5, bptt=6, max_tokens=20_000)
    datamodule.setup()
    pl.seed_everything(0)
    task = LanguageModelTask(
        ModelConfig(vocab_size=datamodule.vocab_size, embedding_size=8, hidden_size=8),
        lr_milestones=[1],
    )
    history = EpochHistory(tmp_path / "history.csv", "test")
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[history, every_epoch],
    )
    trainer.fit(task, datamodule)

    rows = read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in rows] == [1, 2]
    assert [row["lr"] for row in rows] == [20.0, 5.0]
    for row in rows:
        assert 1 < row["train_ppl"] < 20_000 and 1 < row["val_ppl"] < 20_000
    for epoch in (0, 1):  # each checkpoint holds the rows up to its own epoch, under the key
        saved = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=False)
        assert saved["callbacks"]["EpochHistory"]["rows"] == rows[: epoch + 1]
