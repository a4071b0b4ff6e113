"""R runs as one Lightning job: each run trains as its own LanguageModelTask would, logs its
own metrics, and comes out as a single-run checkpoint that LanguageModelTask reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hitnet.data import PTBDataModule
from hitnet.language_model import ModelConfig, RNNLanguageModel
from hitnet.lightning_module import LanguageModelTask
from hitnet.multirun_task import StackedRunsTask
from hitnet.quantizers import QuantConfig
from tests.hitnet.conftest import cpu_trainer as _trainer

TERNARY = QuantConfig(weight="ttq", activation="btq")
LIMITS = {"limit_train_batches": 4, "limit_val_batches": 2, "max_epochs": 2}


@pytest.fixture(scope="module")
def small_ptb(ptb_dir):
    datamodule = PTBDataModule(ptb_dir, batch_size=5, eval_batch_size=5, bptt=6, max_tokens=20_000)
    datamodule.setup()
    return datamodule


def _config(vocab_size: int, **kwargs) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, embedding_size=8, hidden_size=8, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_each_stacked_run_trains_as_its_own_single_run_task(small_ptb, cell):
    """Without noise (full precision, no dropout) a single run is deterministic given its seed,
    so each stacked run must match it: per-run lr, lr schedule, clipping, metrics, weights."""
    config = _config(small_ptb.vocab_size, cell=cell, dropout=0.0)
    recipe = {"lr_milestones": [1], "lr_decay": 0.5}
    stacked = StackedRunsTask(config, seeds=[3, 4], lrs=[20.0, 5.0], **recipe)
    stacked_trainer = _trainer(**LIMITS)
    stacked_trainer.fit(stacked, small_ptb)
    for run, (seed, lr) in enumerate([(3, 20.0), (4, 5.0)]):
        torch.manual_seed(seed)  # as StackedRunsTask seeds each run's model
        single = LanguageModelTask(config, lr=lr, **recipe)
        trainer = _trainer(gradient_clip_val=0.25, **LIMITS)
        trainer.fit(single, small_ptb)
        logged = stacked_trainer.callback_metrics
        for metric in ("train_ppl", "val_ppl"):
            expected = trainer.callback_metrics[metric].item()
            assert logged[f"{metric}/run{run}"].item() == pytest.approx(expected, rel=1e-4)
        assert logged[f"lr/run{run}"].item() == lr * 0.5  # the epoch after the milestone
        for name, value in single.model.state_dict().items():
            got = stacked.model.run_state_dict(run)[name]
            assert torch.allclose(got, value, atol=1e-4), name


def test_a_run_checkpoint_is_a_single_run_checkpoint_of_that_run(small_ptb, tmp_path: Path):
    config = _config(small_ptb.vocab_size, quant=TERNARY, dropout=0.2, lambda_sigma=2.0)
    stacked = StackedRunsTask(config, seeds=[0, 1], lrs=10.0, distill_weight=0.9)
    torch.manual_seed(9)
    stacked.set_teacher(RNNLanguageModel(config.full_precision()))
    trainer = _trainer(**LIMITS)
    trainer.fit(stacked, small_ptb)
    ppls = []
    for run in range(2):
        path = tmp_path / f"run{run}.ckpt"
        torch.save(stacked.run_checkpoint(run), path)
        single = LanguageModelTask.load_from_checkpoint(path)
        assert single.hparams.distill_weight == 0.9 and single.hparams.lr == 10.0
        (result,) = _trainer(limit_val_batches=2).validate(single, small_ptb, verbose=False)
        # the same weights, BTQ drawn from the same eval seed: the perplexity the job logged
        logged = trainer.callback_metrics[f"val_ppl/run{run}"].item()
        assert result["val_ppl"] == pytest.approx(logged, rel=1e-5)
        ppls.append(result["val_ppl"])
    assert ppls[0] != ppls[1]  # two runs, two models


def test_bad_run_settings_are_rejected():
    config = _config(20)
    with pytest.raises(ValueError, match="one lr per seed"):
        StackedRunsTask(config, seeds=[0, 1], lrs=[1.0])
    with pytest.raises(ValueError, match="lr_decay"):
        StackedRunsTask(config, seeds=[0], lr_decay=2.0)
