"""The training stage: its link to the FP model (initial weights, distillation teacher) and
its Trainer's hardware switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hitnet.lightning_module import LanguageModelTask
from pipeline.builders import build_trainer
from pipeline.params import Params, ParamsError
from pipeline.train import train
from tests.pipeline.conftest import SMOKE, deep_update

# The smoke run's tiny model, distilled, with its activations' noise ramped in over three
# steps and averaged in its last epoch, without MLflow.
TINY = deep_update(
    SMOKE,
    {
        "train_ternary": {
            "distill_weight": 0.5,
            "distill_temperature": 2.0,
            "average_from_epoch": 2,
            "activation_warmup_steps": 3,
        },
        "tracking": {"enabled": False},
    },
)


@pytest.fixture
def fp_model(tmp_path: Path, ptb_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny FP LSTM trained by the stage in tmp_path, the working directory; its model.ckpt."""
    monkeypatch.chdir(tmp_path)
    params = Params.model_validate(TINY)
    train(params, "lstm", "fp", ptb_dir, tmp_path / "fp", work_root=tmp_path / "ck")
    return tmp_path / "fp" / "model.ckpt"


def test_distillation_without_an_fp_model_fails_before_any_work(tmp_path: Path, ptb_dir):
    params = Params.model_validate(TINY)
    with pytest.raises(ValueError, match=r"train_ternary@gru: distill_weight > 0 .*--init"):
        train(params, "gru", "ternary", ptb_dir, tmp_path / "out", work_root=tmp_path / "ck")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_a_distilled_averaged_ternary_stage_starts_from_its_fp_model_and_saves_one_model(
    tmp_path: Path, ptb_dir, fp_model: Path
):
    params = Params.model_validate(TINY)
    metrics = train(
        params,
        "lstm",
        "ternary",
        ptb_dir,
        tmp_path / "ternary",
        init_from=fp_model,
        work_root=tmp_path / "ck",
    )
    assert metrics["epochs"] == SMOKE["train_ternary"]["epochs"] and torch.isfinite(
        torch.tensor(metrics["test_ppl"])
    )

    fp = torch.load(tmp_path / "fp" / "model.ckpt", weights_only=True)["state_dict"]
    saved = torch.load(tmp_path / "ternary" / "model.ckpt", weights_only=True)
    assert "current_model_state" not in saved  # the averaged model only, not the training weights
    ternary = saved["state_dict"]
    assert ternary.keys() == fp.keys()  # the teacher is not saved with the model
    assert not torch.equal(
        ternary["model.recurrent.weight_hh_l0"], fp["model.recurrent.weight_hh_l0"]
    )
    task = LanguageModelTask.load_from_checkpoint(tmp_path / "ternary" / "model.ckpt")
    assert task.hparams.distill_weight == 0.5 and task.model.config.quant.weight == "ttq"
    assert task.hparams.activation_warmup_steps == 3


@pytest.mark.parametrize("deterministic", [False, True])
def test_hardware_deterministic_sets_torchs_deterministic_algorithms_for_the_stage(
    tmp_path: Path, deterministic: bool
):
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    params = Params.model_validate(
        deep_update(TINY, {"hardware": {"deterministic": deterministic}})
    )
    try:
        build_trainer(params, params.recipe("ternary", "gru"), tmp_path, [])
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        # an op without a deterministic kernel warns instead of stopping the run
        assert torch.is_deterministic_algorithms_warn_only_enabled() is deterministic
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.slow
def test_a_stage_killed_after_its_last_epoch_finishes_on_rerun_with_its_whole_history(
    tmp_path: Path, ptb_dir, monkeypatch: pytest.MonkeyPatch
):
    """Fault: a kill during the test or export, after the last epoch's checkpoint, left a
    run with no epoch to train, and the rerun (whose outs DVC deletes first) had no CSV."""
    monkeypatch.chdir(tmp_path)
    params = Params.model_validate(TINY)
    out, work_root = tmp_path / "fp", tmp_path / "ck"

    def killed(checkpoint: Path, destination: Path) -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after it runs

    monkeypatch.setattr("pipeline.train.export_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train(params, "lstm", "fp", ptb_dir, out, work_root=work_root)
    assert any(work_root.iterdir())  # the checkpoints of every epoch stay
    for name in ("history.csv", "model.ckpt", "metrics.json"):
        (out / name).unlink(missing_ok=True)  # as `dvc repro` removes a stage's outs
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    metrics = train(params, "lstm", "fp", ptb_dir, out, work_root=work_root)
    epochs = SMOKE["train_fp"]["epochs"]
    assert metrics["epochs"] == epochs
    assert [row.split(",")[0] for row in (out / "history.csv").read_text().splitlines()] == [
        "epoch",
        *map(str, range(1, epochs + 1)),
    ]
    assert (out / "model.ckpt").is_file() and not any(work_root.iterdir())


@pytest.mark.slow
def test_the_same_model_is_the_same_bytes_in_two_checkouts(
    tmp_path: Path, ptb_dir, monkeypatch: pytest.MonkeyPatch
):
    """Fault: model.ckpt held absolute paths (the callbacks' state), so two clones of the
    project wrote different bytes, and DVC different hashes, for the same model."""
    params = Params.model_validate(TINY)
    models = []
    for clone in ("one", "another/clone"):
        checkout = tmp_path / clone
        checkout.mkdir(parents=True)
        monkeypatch.chdir(checkout)
        train(params, "gru", "fp", ptb_dir, Path("runs/fp/gru"))  # relative, as DVC runs it
        models.append((checkout / "runs/fp/gru/model.ckpt").read_bytes())
    assert models[0] == models[1]


@pytest.mark.slow
def test_an_fp_model_of_another_cell_is_named_as_the_wrong_init(
    tmp_path: Path, ptb_dir, fp_model: Path
):
    params = Params.model_validate(TINY)
    wrong_init = rf"--init {fp_model} is not this stage's FP model \(a gru"
    with pytest.raises(ParamsError, match=wrong_init):
        train(params, "gru", "ternary", ptb_dir, tmp_path / "t", init_from=fp_model, work_root="ck")
    assert not (tmp_path / "t").exists()
