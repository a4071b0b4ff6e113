"""Training procedure: perplexity definition, lr schedule, learning on PTB, exact resume."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from hitnet.averaging import AveragedSGD
from hitnet.data import PTBDataModule
from hitnet.language_model import ModelConfig
from hitnet.lightning_module import Distillation, LanguageModelTask, TrainingDiverged
from hitnet.quantizers import QuantConfig
from tests.hitnet.conftest import cpu_trainer

TERNARY = QuantConfig(weight="ttq", activation="btq")


def _trainer(**kwargs) -> pl.Trainer:
    return cpu_trainer(**{"gradient_clip_val": 0.25, **kwargs})


FULL_PRECISION = QuantConfig()


def _task(vocab_size: int, quant: QuantConfig = FULL_PRECISION, cell: str = "lstm", **kwargs):
    config = ModelConfig(
        vocab_size=vocab_size,
        cell=cell,
        embedding_size=32,
        hidden_size=32,
        dropout=0.0,
        quant=quant,
        lambda_sigma=kwargs.pop("slope", 1.0),
        lambda_tanh=kwargs.pop("slope_t", 1.0),
    )
    return LanguageModelTask(config, **kwargs)


@pytest.fixture(scope="module")
def small_ptb(ptb_dir):
    datamodule = PTBDataModule(
        ptb_dir, batch_size=10, eval_batch_size=10, bptt=20, max_tokens=60_000
    )
    datamodule.setup()
    return datamodule


def test_test_perplexity_is_exp_of_mean_nll_over_all_tokens(small_ptb):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size)
    (result,) = _trainer(limit_test_batches=7).test(task, small_ptb, verbose=False)

    task.model.eval()
    nll, count, state = 0.0, 0, None
    with torch.no_grad():
        for index, (inputs, targets) in enumerate(small_ptb.test_dataloader()):
            if index == 7:
                break
            logits, state = task.model(inputs, state)
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    assert result["test_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_lr_is_divided_by_four_when_validation_perplexity_does_not_improve():
    task = _task(20, lr=20.0)
    optimizer = task.configure_optimizers()
    scheduler = task.lr_schedule
    lrs = []
    for val_ppl in [100.0, 90.0, 90.0, 80.0, 85.0]:
        scheduler.step(val_ppl)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [20.0, 20.0, 5.0, 5.0, 1.25]


def test_lr_threshold_counts_small_improvements_as_a_plateau():
    task = _task(20, lr=20.0, lr_patience=1, lr_threshold=0.01)
    optimizer = task.configure_optimizers()
    lrs = []
    # 99.5 and 99.2 beat 100 by less than 1%: two epochs without improvement -> lr / 4;
    # 95 is 4% better, so the count starts again
    for val_ppl in [100.0, 99.5, 99.2, 95.0, 94.5]:
        task.lr_schedule.step(val_ppl)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [20.0, 20.0, 5.0, 5.0, 5.0]


def test_lr_milestones_cut_the_lr_after_those_epochs_whatever_validation_says():
    task = _task(20, lr=20.0, lr_milestones=[2, 4])
    optimizer = task.configure_optimizers()
    lrs = []
    for _ in range(5):  # stepped after each epoch's validation, whatever it measured
        task.lr_schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    # the lr of epochs 2..6: epoch 2 still trains at 20, epoch 3 at 20 / 4
    assert lrs == [20.0, 5.0, 5.0, 1.25, 1.25]


def test_a_diverged_run_stops_with_an_error_naming_the_loss_and_lr(small_ptb):
    task = _task(small_ptb.vocab_size, lr=1e9)  # each step moves weights by 0.25 * 1e9
    with pytest.raises(
        TrainingDiverged, match=r"diverged: the (train|val) loss is .* at epoch 1 \(lr 1e\+09\)"
    ):
        _trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=2).fit(task, small_ptb)


def test_bad_optimisation_settings_are_rejected():
    with pytest.raises(ValueError, match=r"lr must be > 0, got 0\.0"):
        _task(20, lr=0.0)
    with pytest.raises(ValueError, match=r"lr_decay must be in \(0, 1\), got 4.0"):
        _task(20, lr_decay=4.0)
    with pytest.raises(ValueError, match=r"lr_threshold must be in \[0, 1\), got 1.0"):
        _task(20, lr_threshold=1.0)
    for milestones, message in (
        ([], r"lr_milestones must hold at least 1 item\(s\), got \[\]"),
        ([0, 3], "each of lr_milestones must be >= 1, got 0"),
        ([3, 2], "lr_milestones must be increasing epochs"),
        ([2, 2], "lr_milestones must be increasing epochs"),
    ):
        with pytest.raises(ValueError, match=message):
            _task(20, lr_milestones=milestones)
    with pytest.raises(ValueError, match=r"distill_weight must be in \[0, 1\], got 1.5"):
        _task(20, distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_weight > 0"):
        _task(20).set_teacher(_task(20).model)


def test_distillation_term_is_t_squared_kl_from_teacher_to_student():
    torch.manual_seed(0)
    teacher = _task(20).model
    tokens = torch.randint(0, 20, (5, 3))
    with torch.no_grad():
        teacher_logits, _ = teacher.eval()(tokens)
    student_logits = teacher_logits + torch.randn_like(teacher_logits)
    distillation = Distillation(teacher, temperature=2.0)
    distillation.start_epoch(torch.device("cpu"))

    p = F.softmax(teacher_logits / 2.0, -1).flatten(0, 1)
    log_q = F.log_softmax(student_logits / 2.0, -1).flatten(0, 1)
    expected = 4.0 * (p * (p.log() - log_q)).sum(-1).mean()
    assert distillation.loss(tokens, student_logits) == pytest.approx(expected.item(), rel=1e-5)
    distillation.start_epoch(torch.device("cpu"))
    assert distillation.loss(tokens, teacher_logits).item() == pytest.approx(0.0, abs=1e-6)


class _RecordEpochEnd(Callback):
    """An ordinary callback: what it reads at train-epoch end, and the epoch's windows."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []
        self.windows: list[tuple[float, int]] = []  # (cross-entropy, tokens) per batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.windows.append((outputs["loss"].item(), batch[1].numel()))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        self.seen.append({key: float(metrics[key]) for key in ("train_ppl", "val_ppl", "lr")})
        nll = sum(loss * tokens for loss, tokens in self.windows)
        self.seen[-1]["expected_ppl"] = math.exp(nll / sum(tokens for _, tokens in self.windows))
        self.windows = []


def test_an_ordinary_callback_reads_this_epochs_train_ppl_and_lr_at_train_epoch_end(small_ptb):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size, lr=20.0, lr_milestones=[1])
    record = _RecordEpochEnd()
    _trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[record]).fit(
        task, small_ptb
    )
    assert len(record.seen) == 2
    for epoch in record.seen:  # exp of the mean NLL over the epoch's training tokens
        assert epoch["train_ppl"] == pytest.approx(epoch["expected_ppl"], rel=1e-5)
    assert record.seen[0]["train_ppl"] != record.seen[1]["train_ppl"]
    assert [epoch["lr"] for epoch in record.seen] == [20.0, 5.0]  # cut after epoch 1


def test_the_lr_schedule_steps_after_the_validations_of_a_fit_only(small_ptb):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size, lr=20.0)
    trainer = _trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(task, small_ptb)
    assert task.lr_schedule.last_epoch == 2
    trainer.validate(task, small_ptb, verbose=False)
    assert task.lr_schedule.last_epoch == 2


class _RecordTrainLoss(Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []  # (optimised loss, cross-entropy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pairs.append((outputs["loss"].item(), trainer.callback_metrics["train_loss"].item()))


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_training_optimises_weighted_cross_entropy_plus_distillation(small_ptb, weight):
    pl.seed_everything(0)
    teacher = _task(small_ptb.vocab_size).model
    student = _task(small_ptb.vocab_size, distill_weight=weight, lr=1e-9)
    student.model.load_state_dict(teacher.state_dict())  # the same function: KL is 0
    student.set_teacher(teacher)
    record = _RecordTrainLoss()
    _trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[record]).fit(
        student, small_ptb
    )
    assert len(record.pairs) == 3
    for optimised, cross_entropy in record.pairs:
        assert cross_entropy > 1.0
        assert optimised == pytest.approx((1 - weight) * cross_entropy, abs=1e-4)
    assert not any(key.startswith("_") or "teacher" in key for key in student.state_dict())


class _RecordWeights(Callback):
    def __init__(self) -> None:
        self.after_step: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weights = {name: p.detach().clone() for name, p in pl_module.model.named_parameters()}
        self.after_step.append((trainer.current_epoch, weights))


class _SaveWhileValidating(Callback):
    """Saves a checkpoint at a moment the averaged weights are swapped in."""

    def __init__(self, path) -> None:
        self.path = path
        self.saw_mean_applied = False

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        (averaging,) = [c for c in trainer.callbacks if isinstance(c, AveragedSGD)]
        if averaging.started:
            self.saw_mean_applied = averaging._swapped
            trainer.save_checkpoint(self.path)


def test_averaging_validates_and_saves_the_mean_of_every_step_from_its_epoch(small_ptb, tmp_path):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size, TERNARY, average_from_epoch=2)
    record = _RecordWeights()
    during = _SaveWhileValidating(tmp_path / "during-validation.ckpt")
    trainer = _trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=2,
        limit_test_batches=2,
        enable_checkpointing=True,
        callbacks=[record, during, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(task, small_ptb)
    averaged_val_ppl = trainer.callback_metrics["val_ppl"].item()

    second_epoch = [weights for epoch, weights in record.after_step if epoch == 1]
    last = second_epoch[-1]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["averaging_state"]["n_averaged"] == len(second_epoch) == 4
    for name, trained in last.items():
        mean = torch.stack([weights[name] for weights in second_epoch]).mean(0)
        key = f"model.{name}"
        assert torch.allclose(saved["state_dict"][key], mean, atol=1e-6)
        assert torch.equal(saved["current_model_state"][key], trained)
        # after training the module is the averaged model
        assert torch.equal(dict(task.model.named_parameters())[name], saved["state_dict"][key])
    assert not torch.allclose(saved["state_dict"]["model.decoder.weight"], last["decoder.weight"])
    assert task.lr_schedule.last_epoch == 1  # stepped after epoch 1 only: averaged SGD keeps its lr
    # A checkpoint taken while the mean is swapped in holds the same model and training weights.
    assert during.saw_mean_applied
    also = torch.load(tmp_path / "during-validation.ckpt", weights_only=True)
    for name in last:
        key = f"model.{name}"
        assert torch.equal(also["state_dict"][key], saved["state_dict"][key])
        assert torch.equal(also["current_model_state"][key], last[name])

    # The checkpoint's model is the one validation measured: loaded alone, it scores the same.
    loaded = LanguageModelTask.load_from_checkpoint(tmp_path / "last.ckpt")
    (validated,) = _trainer(limit_val_batches=2).validate(loaded, small_ptb, verbose=False)
    assert validated["val_ppl"] == pytest.approx(averaged_val_ppl, rel=1e-6)
    # And the training Trainer tests that checkpoint as saved: the mean.
    (tested,) = trainer.test(task, small_ptb, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    (alone,) = _trainer(limit_test_batches=2).test(loaded, small_ptb, verbose=False)
    assert tested["test_ppl"] == pytest.approx(alone["test_ppl"], rel=1e-6)


def test_averaging_before_its_first_epoch_leaves_the_model_and_checkpoint_alone(
    small_ptb, tmp_path
):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size, TERNARY, average_from_epoch=3)
    trainer = _trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(task, small_ptb)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "averaging_state" not in saved and "current_model_state" not in saved
    for name, p in task.model.named_parameters():
        assert torch.equal(saved["state_dict"][f"model.{name}"], p)
    assert task.lr_schedule.last_epoch == 2  # not averaging yet: the plateau rule stepped
    with pytest.raises(ValueError, match="average_from_epoch must be >= 1, got 0"):
        _task(20, average_from_epoch=0)


class _RecordNoiseLevels(Callback):
    def __init__(self) -> None:
        self.levels: list[list[float]] = []  # per step: gates, candidate, hidden

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layer = pl_module.model.recurrent
        quantizers = (layer.gate_quantizer, layer.candidate_quantizer, layer.hidden_quantizer)
        self.levels.append([q.noise_level.item() for q in quantizers])


def test_activation_noise_ramps_in_over_the_warmup_steps_and_validation_is_ternary(small_ptb):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size, TERNARY, cell="gru", activation_warmup_steps=4)
    record = _RecordNoiseLevels()
    trainer = _trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, callbacks=[record])
    trainer.fit(task, small_ptb)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # step k: (k + 1) / 4, then all of it
    assert record.levels == [[level] * 3 for level in expected]

    # What validation measured is the fully ternary model: a fresh model, never warmed up,
    # with the same weights scores the same.
    fresh = _task(small_ptb.vocab_size, TERNARY, cell="gru")
    fresh.load_state_dict(task.state_dict())
    task.model.recurrent.gate_quantizer.set_noise_level(0.1)  # ignored outside training
    validate = _trainer(limit_val_batches=2)
    (warmed,) = validate.validate(task, small_ptb, verbose=False)
    (plain,) = validate.validate(fresh, small_ptb, verbose=False)
    assert warmed["val_ppl"] == plain["val_ppl"]
    with pytest.raises(ValueError, match="activation_warmup_steps must be >= 0, got -5"):
        _task(20, activation_warmup_steps=-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cell", "quant", "slope"),
    [("lstm", FULL_PRECISION, 1.0), ("lstm", TERNARY, 1.0), ("gru", TERNARY, 2.0)],
    ids=["fp-lstm", "ternary-lstm", "ternary-gru-sloped"],
)
def test_a_few_hundred_steps_lower_validation_perplexity_well_below_its_start(
    small_ptb, cell, quant, slope
):
    pl.seed_everything(0)
    task = _task(small_ptb.vocab_size, quant, cell, slope=slope, slope_t=slope)
    trainer = _trainer(max_epochs=1, limit_train_batches=250, limit_val_batches=15)
    (before,) = trainer.validate(task, small_ptb, verbose=False)
    trainer.fit(task, small_ptb)
    after = trainer.callback_metrics
    assert before["val_ppl"] > 5000  # ~ vocabulary size: an untrained model
    assert after["val_ppl"] < 0.2 * before["val_ppl"]
    assert math.isfinite(after["train_ppl"]) and after["lr"] == 20.0


class _RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append((trainer.current_epoch, outputs["loss"].item()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quant", "distill_weight", "average_from_epoch", "activation_warmup_steps", "milestones"),
    [
        (FULL_PRECISION, 0.0, None, 0, None),
        (TERNARY, 0.0, None, 0, None),
        (TERNARY, 0.5, None, 0, [2]),  # the resumed epoch trains at the cut lr
        (TERNARY, 0.0, 2, 0, None),
        (TERNARY, 0.0, None, 15, None),  # the resumed epoch (steps 12-17) ends the ramp
    ],
    ids=[
        "fp",
        "ternary",
        "ternary-distilled-milestones",
        "ternary-averaged",
        "ternary-warmup",
    ],
)
def test_checkpoint_round_trip_resumes_exactly(
    small_ptb,
    tmp_path,
    quant,
    distill_weight,
    average_from_epoch,
    activation_warmup_steps,
    milestones,
):
    limits = {"limit_train_batches": 6, "limit_val_batches": 3}
    config = ModelConfig(
        vocab_size=small_ptb.vocab_size, embedding_size=16, hidden_size=16, dropout=0.3
    )
    torch.manual_seed(7)
    teacher = LanguageModelTask(config).model

    def task():
        task = LanguageModelTask(
            ModelConfig(**{**config.__dict__, "quant": quant}),
            lr=20.0,
            distill_weight=distill_weight,
            average_from_epoch=average_from_epoch,
            activation_warmup_steps=activation_warmup_steps,
            lr_milestones=milestones,
        )
        if distill_weight:
            task.set_teacher(teacher)
        return task

    pl.seed_everything(1)
    uninterrupted = _RecordLosses()
    straight = _trainer(max_epochs=3, callbacks=[uninterrupted], **limits)
    straight_task = task()
    straight.fit(straight_task, small_ptb)

    pl.seed_everything(1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = _trainer(
        max_epochs=2,
        callbacks=[checkpoints],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        **limits,
    )
    first.fit(task(), small_ptb)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    if average_from_epoch is None:
        assert saved["hitnet_lr_schedule"]["last_epoch"] == 2  # both epochs' lr steps are in it

    pl.seed_everything(123)  # a different process would not share the first run's RNG
    resumed = _RecordLosses()
    second = _trainer(
        max_epochs=3, callbacks=[resumed], default_root_dir=tmp_path / "second", **limits
    )
    resumed_task = task()
    second.fit(resumed_task, small_ptb, ckpt_path=tmp_path / "last.ckpt")

    expected = [loss for epoch, loss in uninterrupted.losses if epoch == 2]
    assert [epoch for epoch, _ in resumed.losses] == [2] * len(expected)
    assert [loss for _, loss in resumed.losses] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert second.current_epoch == 3
    assert resumed_task.lr_schedule.last_epoch == straight_task.lr_schedule.last_epoch
    assert resumed_task.lr_schedule.last_epoch == (3 if average_from_epoch is None else 1)
    # the last validation (of the averaged weights, when averaging) matches too
    assert second.callback_metrics["val_ppl"].item() == pytest.approx(
        straight.callback_metrics["val_ppl"].item(), rel=1e-6
    )
