"""The report stage's evaluation of a ternary checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl

from pipeline import report
from pipeline.params import Params
from pipeline.train import build_task, datamodule_for
from tests.pipeline.conftest import SMOKE, deep_update

TEST_BATCHES = 3


def _params(quant_mode: str, report_mode: str | None) -> Params:
    changes = {"quant": {"btq_eval": quant_mode}, "report": {"btq_eval": report_mode}}
    return Params.model_validate(deep_update(SMOKE, changes))


@pytest.fixture(scope="module")
def ternary_checkpoint(tmp_path_factory: pytest.TempPathFactory, ptb_dir: Path) -> Path:
    """A tiny ternary LSTM after a few steps, validated with stochastic BTQ."""
    params = _params("stochastic", None)
    datamodule = datamodule_for(params, ptb_dir)
    datamodule.setup("fit")
    pl.seed_everything(0)
    task = build_task(params, "lstm", "ternary", datamodule.vocab_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule)
    path = tmp_path_factory.mktemp("ternary") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_report_evaluates_btq_as_its_params_say(ternary_checkpoint: Path, ptb_dir: Path):
    def perplexities(quant_mode: str, report_mode: str | None) -> list[float]:
        params = _params(quant_mode, report_mode)
        return report.test_perplexities(ternary_checkpoint, params, ptb_dir, TEST_BATCHES)

    draws = perplexities("stochastic", None)
    assert len(draws) == len(SMOKE["report"]["eval_seeds"]) == len(set(draws))
    rounded = perplexities("stochastic", "deterministic")
    assert len(rounded) == 1 and rounded[0] not in draws
    # without report.btq_eval the report follows quant.btq_eval, whatever the checkpoint says
    assert perplexities("deterministic", None) == rounded
    assert perplexities("deterministic", "stochastic") == draws


@pytest.mark.slow
def test_report_compiles_the_recurrence_as_training_does(ternary_checkpoint: Path, ptb_dir: Path):
    eager = _params("deterministic", None)
    compiled = eager.model_copy(
        update={"hardware": eager.hardware.model_copy(update={"compile": "default"})}
    )
    for params, mode in ((eager, None), (compiled, "default")):
        task = report.load_for_evaluation(ternary_checkpoint, params)
        assert task.model.recurrent.compile_mode == mode
    # the same function either way, so the same rounded perplexity up to float32 sums
    (rounded_eager,) = report.test_perplexities(ternary_checkpoint, eager, ptb_dir, TEST_BATCHES)
    (rounded_fast,) = report.test_perplexities(ternary_checkpoint, compiled, ptb_dir, TEST_BATCHES)
    assert rounded_fast == pytest.approx(rounded_eager, rel=1e-4)
