"""R runs as one Lightning job: each run trains as its own LanguageModelTask would, logs its
own metrics, and comes out as a single-run checkpoint that LanguageModelTask reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint

from hitnet.averaging import AveragedSGD
from hitnet.data import PTBDataModule
from hitnet.language_model import ModelConfig, RNNLanguageModel
from hitnet.lightning_module import LanguageModelTask, TrainingDiverged
from hitnet.multirun_task import StackedRunsTask, single_run_checkpoint
from hitnet.quantizers import QuantConfig
from hitnet.warmup import ActivationWarmup
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
    stacked = StackedRunsTask(config, seeds=[0, 1], lr=10.0, distill_weight=0.9)
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
    with pytest.raises(ValueError, match=r"lr_decay must be in \(0, 1\), got 2\.0"):
        StackedRunsTask(config, seeds=[0], lr_decay=2.0)
    with pytest.raises(ValueError, match=r"lr must be > 0, got -1\.0"):  # every run's lr
        StackedRunsTask(config, seeds=[0, 1], lrs=[1.0, -1.0])
    with pytest.raises(ValueError, match="not both"):
        StackedRunsTask(config, seeds=[0, 1], lrs=[1.0, 2.0], lr=1.0)
    with pytest.raises(ValueError, match="average_from_epoch"):
        StackedRunsTask(config, seeds=[0], average_from_epoch=0)
    with pytest.raises(TypeError, match="lr_decai"):
        StackedRunsTask(config, seeds=[0], lr_decai=0.5)


class _EpochMetrics(Checkpoint):
    """Each epoch's logged metrics. A ``Checkpoint`` so that Lightning calls it after the
    module's ``on_train_epoch_end``, where the train perplexity is logged."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(task: pl.LightningModule, datamodule, out: Path, epochs: int, **kwargs) -> _EpochMetrics:
    """Fits with per-epoch metrics and ``out/last.ckpt``; ``kwargs`` go to ``fit``. A single
    run is clipped by Lightning at StackedRunsTask's default ``clip``."""
    metrics = _EpochMetrics()
    # saves every epoch (with save_top_k=0, last.ckpt would be saved at the end of training
    # only, after averaged SGD has put the mean in the place of the training weights)
    last = ModelCheckpoint(dirpath=out, save_last=True)
    settings = {**LIMITS, "max_epochs": epochs, "enable_checkpointing": True}
    if isinstance(task, LanguageModelTask):
        settings["gradient_clip_val"] = 0.25
    trainer = _trainer(callbacks=[metrics, last], **settings)
    trainer.fit(task, datamodule, **kwargs)
    return metrics


def _noisy_ternary(vocab_size: int, cell: str = "lstm") -> ModelConfig:
    """BTQ's draws are the training noise (dropout off: a single run draws its masks through
    ``F.dropout``, which no generator reaches)."""
    return _config(vocab_size, cell=cell, quant=TERNARY, dropout=0.0, lambda_sigma=2.0)


def _single_run(config: ModelConfig, seed: int, lr: float, recipe: dict) -> LanguageModelTask:
    torch.manual_seed(seed)  # as StackedRunsTask seeds each run's model
    task = LanguageModelTask(config, lr=lr, **recipe)
    # A single run draws its noise from the global RNG; a stacked run from a generator
    # seeded with its seed as training starts: seeded alike, they draw the same numbers.
    torch.manual_seed(seed)
    return task


def _assert_same_weights(got: dict, expected: dict, tol: float = 1e-5) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=tol), name


def _run_state(state_dict: dict, run: int) -> dict:
    """Run ``run``'s slice of a stacked task's state_dict, named as a single task's."""
    return {name: value[run] for name, value in state_dict.items()}


FEATURES = {
    "averaged SGD": {"average_from_epoch": 2},
    "activation warm-up": {"activation_warmup_steps": 6},
}


@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_stacked_runs_with_the_recipe_part_on_train_as_their_single_runs(
    small_ptb, tmp_path, feature
):
    """With BTQ noise: each run's per-epoch perplexities and lr, its weights after the fit and
    in the last checkpoint (the mean, when averaging, with the training weights beside it)
    are those of its own LanguageModelTask."""
    config = _noisy_ternary(small_ptb.vocab_size)
    recipe = {"lr_threshold": 0.2, **FEATURES[feature]}  # a plateau cut now and then
    seeds, lrs = [3, 4], [20.0, 5.0]
    stacked = StackedRunsTask(config, seeds=seeds, lrs=lrs, **recipe)
    stacked_metrics = _fit(stacked, small_ptb, tmp_path / "stacked", epochs=3)
    stacked_saved = torch.load(tmp_path / "stacked" / "last.ckpt", weights_only=True)
    for run, (seed, lr) in enumerate(zip(seeds, lrs, strict=True)):
        single = _single_run(config, seed, lr, recipe)
        single_metrics = _fit(single, small_ptb, tmp_path / f"run{run}", epochs=3)
        for got, expected in zip(stacked_metrics.epochs, single_metrics.epochs, strict=True):
            for metric in ("train_ppl", "val_ppl", "lr"):
                assert got[f"{metric}/run{run}"] == pytest.approx(expected[metric], rel=1e-4)
        _assert_same_weights(stacked.model.run_state_dict(run), single.model.state_dict())
        # the job's checkpoint gives the run's own: the mean (when averaging) and the recipe
        saved = torch.load(tmp_path / f"run{run}" / "last.ckpt", weights_only=True)
        from_stacked = single_run_checkpoint(stacked_saved, run)
        assert from_stacked["hyper_parameters"] == saved["hyper_parameters"]
        _assert_same_weights(from_stacked["state_dict"], saved["state_dict"])
        # and beside it, resuming, the training weights
        assert ("current_model_state" in stacked_saved) == ("current_model_state" in saved)
        if "current_model_state" in saved:
            stacked_current = stacked_saved["current_model_state"]
            _assert_same_weights(_run_state(stacked_current, run), saved["current_model_state"])
    if feature == "averaged SGD":  # the lrs stop where they are as averaging starts
        for run in range(2):
            assert (
                stacked_metrics.epochs[1][f"lr/run{run}"]
                == stacked_metrics.epochs[2][f"lr/run{run}"]
            )


RESUMED = {
    # the warm-up goes on after the kill (12 steps: 3 epochs)
    "plateau lr schedules, warm-up": {"lr_threshold": 0.2, "activation_warmup_steps": 12},
    "averaged SGD": {"average_from_epoch": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RESUMED))
def test_a_resumed_fit_goes_on_exactly_as_an_uninterrupted_one(small_ptb, tmp_path, recipe):
    """Killed after epoch 2 and resumed from last.ckpt by a new job: the same weights, the
    same per-run lrs, lr schedules and noise generators as the fit that ran straight on."""
    config = _noisy_ternary(small_ptb.vocab_size, cell="gru")
    seeds, lrs = [5, 6], [20.0, 2.0]

    def task() -> StackedRunsTask:
        return StackedRunsTask(config, seeds=seeds, lrs=lrs, **RESUMED[recipe])

    straight = task()
    straight_metrics = _fit(straight, small_ptb, tmp_path / "straight", epochs=4)
    _fit(task(), small_ptb, tmp_path / "killed", epochs=2)
    torch.manual_seed(123)  # a new process: another global RNG state
    resumed = task()
    last = tmp_path / "killed" / "last.ckpt"
    resumed_metrics = _fit(resumed, small_ptb, tmp_path / "resumed", epochs=4, ckpt_path=last)

    assert len(resumed_metrics.epochs) == 2
    for got, expected in zip(resumed_metrics.epochs, straight_metrics.epochs[2:], strict=True):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6), key
    _assert_same_weights(resumed.state_dict(), straight.state_dict(), tol=1e-6)
    assert torch.equal(resumed._rates(), straight._rates())
    for got, expected in zip(resumed._schedules, straight._schedules, strict=True):
        assert got.state_dict() == expected.state_dict()
    for got, expected in zip(resumed._generators, straight._generators, strict=True):
        assert torch.equal(got.get_state(), expected.get_state())
    saved = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)
    expected = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)
    averaged = "average_from_epoch" in RESUMED[recipe]
    assert ("current_model_state" in saved) == ("current_model_state" in expected) == averaged
    for key in ("state_dict", "current_model_state"):
        _assert_same_weights(saved.get(key, {}), expected.get(key, {}), tol=1e-6)
    if not averaged:  # the schedules did cut the lrs, each on its own run's perplexities
        assert straight._rates().tolist() != lrs


def test_a_diverged_run_stops_the_job_naming_its_seed_as_its_own_job_stops(small_ptb, tmp_path):
    config = _config(small_ptb.vocab_size, dropout=0.0)
    seeds, lrs = [3, 4], [1.0, 1e9]  # run 1's steps move weights by 0.25 * 1e9
    stacked = StackedRunsTask(config, seeds=seeds, lrs=lrs)
    with pytest.raises(TrainingDiverged) as stacked_error:
        _fit(stacked, small_ptb, tmp_path / "stacked", epochs=2)
    message = str(stacked_error.value)
    assert "run 1 (seed 4, lr 1e+09)" in message and "seed 3" not in message
    with pytest.raises(TrainingDiverged) as single_error:
        _fit(_single_run(config, 4, 1e9, {}), small_ptb, tmp_path / "run1", epochs=2)
    # stopped where the single job stops: the same epoch and loss (train or val)
    split = re.search(r"the (\w+) loss .* at epoch (\d+)", str(single_error.value)).groups()
    assert re.search(rf"epoch {split[1]}: of the {split[0]} loss", message)
    assert not (tmp_path / "stacked" / "last.ckpt").exists()  # nothing recorded the diverged


def test_the_recipe_is_language_model_tasks_taken_once():
    recipe = {"lr": 3.0, "lr_milestones": [2], "average_from_epoch": 4, "distill_weight": 0.5}
    stacked = StackedRunsTask(_config(20), seeds=[0, 1], **recipe)
    single = LanguageModelTask(_config(20), **recipe)
    assert stacked.hparams.lrs == [3.0, 3.0]
    for name, value in single.hparams.items():
        if name != "lr":
            assert stacked.hparams[name] == value, name
    # the single run's averaging and warm-up; its lr and RNG parts are per run in the task
    assert [type(part) for part in stacked.configure_callbacks()] == [
        type(part)
        for part in single.configure_callbacks()
        if isinstance(part, AveragedSGD | ActivationWarmup)
    ]
    rebuilt = StackedRunsTask(**stacked.hparams)  # as load_from_checkpoint rebuilds it
    assert rebuilt.hparams == stacked.hparams


def test_a_stacked_jobs_clip_is_checked_as_declared():
    with pytest.raises(ValueError, match=r"clip must be > 0, got 0\.0"):
        StackedRunsTask(_config(20), seeds=[0], clip=0.0)
