"""The study stage: its rows, its fine-tune recipe, its tables and figures, and the cache of
finished rows that a rerun after a kill starts from. `dvc repro` of it: test_dvc_repro.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import study
from pipeline.builders import datamodule_for
from pipeline.params import Params
from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import SMOKE, deep_update, save_briefly_trained

# The smoke project's params (the repository's, smoke changes applied), without MLflow.
PARAMS = Params.model_validate(
    deep_update(
        yaml.safe_load((REPO_ROOT / "params.yaml").read_text()),
        deep_update(SMOKE, {"tracking": {"enabled": False}}),
    )
)


def test_the_table_puts_each_quantizer_on_weights_only_then_activations_only_then_the_hybrid():
    rows = study.table_rows(PARAMS, "lstm")
    assert [row.key for row in rows] == [
        "weights_uq",
        "weights_ttq",
        "weights_btq",
        "activations_uq",
        "activations_ttq",
        "activations_btq",
        "hybrid",
    ]
    configured = PARAMS.quant.for_cell("lstm")
    for row in rows[:6]:
        target, kind = row.key.split("_")
        quant = row.quant
        assert (quant.weight, quant.activation) == (
            (kind, "none") if target == "weights" else ("none", kind)
        )
        assert (quant.lambda_sigma, quant.lambda_tanh) == (1.0, 1.0)  # the plain cell
        assert quant.ttq_threshold == configured.ttq_threshold  # the cell's own threshold
    assert rows[0].label == "UQ-2bit, weights only"
    hybrid = rows[-1]
    assert hybrid.quant == configured and (configured.lambda_sigma, configured.weight) == (
        2.0,
        "ttq",
    )
    assert "slopes 2 / 2" in hybrid.label


def test_the_ablation_sets_both_slopes_of_the_hybrid_to_each_lambda():
    params = PARAMS.model_copy(
        update={"study": PARAMS.study.model_copy(update={"lambdas": [1.0, 1.5, 4.0]})}
    )
    rows = study.ablation_rows(params, "gru")
    assert [row.key for row in rows] == ["lambda_1", "lambda_1.5", "lambda_4"]
    for row, slope in zip(rows, [1.0, 1.5, 4.0], strict=True):
        assert (row.quant.lambda_sigma, row.quant.lambda_tanh) == (slope, slope)
        changed = row.quant.model_copy(update={"lambda_sigma": 1.0, "lambda_tanh": 1.0})
        assert changed == params.quant.for_cell("gru")  # the GRU's configured slopes are 1


def test_the_fine_tune_is_the_cells_ternary_recipe_cut_to_the_studys_epochs():
    params = study.study_recipe(PARAMS, "lstm")
    recipe, full = params.recipe("ternary", "lstm"), PARAMS.recipe("ternary", "lstm")
    assert recipe.epochs == PARAMS.study.epochs == 1
    assert recipe.limit_train_batches == PARAMS.study.limit_train_batches
    assert recipe.limit_eval_batches == PARAMS.study.limit_eval_batches
    for key in ("lr", "dropout", "clip", "distill_weight", "lr_milestones"):
        assert getattr(recipe, key) == getattr(full, key)


def _metrics() -> dict:
    result = {"ptq_ppl": 300.0, "qat_ppl": 150.0, "polarized_ptq": 0.25, "polarized_qat": 0.5}
    result |= {"btq_mse_ptq": 0.2, "btq_mse_qat": 0.1}
    keys = [row.key for row in study.table_rows(PARAMS, "lstm")]
    table = {key: dict(result) for key in keys}
    table["hybrid"]["paper"] = 110.3
    return {
        "fp": {"test_ppl": 90.0, "paper": 97.2},
        "table": table,
        "ablation": {"lambda_1": dict(result), "lambda_2": {**result, "qat_ppl": 140.0}},
        "mse": {name: {"uq": 0.05, "ttq": 0.003, "btq": 0.1} for name in ("W_ih", "hidden")},
        "finetune_epochs": 1,
    }


def test_the_markdown_tables_hold_every_row_and_the_papers_numbers():
    table = study.markdown(_metrics(), PARAMS, "lstm")
    assert "| nothing (FP) | 90.00 | | 97.2 |" in table
    assert "| UQ-2bit, weights only | 300.00 | 150.00 |  |" in table
    assert "slopes 2 / 2 | 300.00 | 150.00 | 110.3 (fully trained) |" in table
    assert "| 2 | 0.250 -> 0.500 | 0.2000 -> 0.1000 | 300.00 | 140.00 |" in table
    assert "| W_ih | 0.05 | 0.003 | 0.1 |" in table
    assert "after a 1-epoch fine-tune" in table and "activations rounded" in table


def test_flat_metrics_names_each_figure_by_its_path():
    flat = study.flat_metrics(_metrics())
    assert flat["table.hybrid.qat_ppl"] == 150.0 and flat["fp.paper"] == 97.2
    assert flat["ablation.lambda_2.qat_ppl"] == 140.0 and flat["mse.W_ih.ttq"] == 0.003


def test_the_figures_are_written(tmp_path: Path):
    study.plot_ablation(_metrics()["ablation"], 0.1, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory: pytest.TempPathFactory, ptb_dir: Path) -> Path:
    """A tiny FP LSTM after one step (the study needs its weights, not its quality)."""
    path = tmp_path_factory.mktemp("fp") / "model.ckpt"
    return save_briefly_trained(PARAMS, "lstm", "fp", ptb_dir, path, steps=1)


def test_a_finished_row_is_kept_and_a_rerun_does_not_train_it_again(
    fp_checkpoint: Path, ptb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    row = study.ablation_rows(PARAMS, "lstm")[0]

    def runner() -> study.Study:
        datamodule = datamodule_for(PARAMS, ptb_dir)
        return study.Study(PARAMS, "lstm", datamodule, fp_checkpoint, tmp_path)

    first = runner().evaluate(row)
    assert set(first) == {
        *("ptq_ppl", "polarized_ptq", "btq_mse_ptq"),  # the FP weights quantized
        *("qat_ppl", "polarized_qat", "btq_mse_qat"),  # after the fine-tune
    }
    assert first["qat_ppl"] != first["ptq_ppl"]  # the fine-tune changed the model
    assert 0 < first["polarized_ptq"] < 1 and 0 < first["btq_mse_ptq"] < 0.25
    assert json.loads((tmp_path / "rows.json").read_text()) == {
        json.dumps(row.quant.model_dump(), sort_keys=True): first
    }

    def no_training(*_args: object) -> None:
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(study, "build_trainer", no_training)
    assert runner().evaluate(row) == first


def test_a_missing_fp_model_is_named(tmp_path: Path, ptb_dir: Path):
    with pytest.raises(FileNotFoundError, match="stage train_fp@gru"):
        study.study(PARAMS, "gru", ptb_dir, tmp_path / "model.ckpt", tmp_path / "out")
