"""The report stage: evaluation of a ternary checkpoint, and the tables over training seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import report
from pipeline.builders import model_dir
from pipeline.params import Params
from tests.pipeline.conftest import SMOKE, deep_update, save_briefly_trained

TEST_BATCHES = 3


def _params(quant_mode: str = "deterministic", **changes: object) -> Params:
    return Params.model_validate(deep_update(SMOKE, {"quant": {"btq_eval": quant_mode}, **changes}))


@pytest.fixture(scope="module")
def ternary_checkpoint(tmp_path_factory: pytest.TempPathFactory, ptb_dir: Path) -> Path:
    """A tiny ternary LSTM after a few steps, validated with stochastic BTQ."""
    path = tmp_path_factory.mktemp("ternary") / "model.ckpt"
    return save_briefly_trained(_params("stochastic"), "lstm", "ternary", ptb_dir, path)


def test_report_evaluates_btq_drawn_or_rounded_whatever_the_model_validated_with(
    ternary_checkpoint: Path, ptb_dir: Path
):
    def perplexities(quant_mode: str, mode: str) -> list[float]:
        params = _params(quant_mode)
        return report.test_perplexities(ternary_checkpoint, params, ptb_dir, TEST_BATCHES, mode)

    draws = perplexities("stochastic", "stochastic")
    assert len(draws) == len(SMOKE["report"]["eval_seeds"]) == len(set(draws))
    rounded = perplexities("stochastic", "deterministic")
    assert len(rounded) == 1 and rounded[0] not in draws
    assert perplexities("deterministic", "deterministic") == rounded
    assert perplexities("deterministic", "stochastic") == draws


@pytest.mark.slow
def test_report_compiles_the_recurrence_as_training_does(ternary_checkpoint: Path, ptb_dir: Path):
    eager = _params()
    compiled = eager.model_copy(
        update={"hardware": eager.hardware.model_copy(update={"compile": "default"})}
    )
    for params, mode in ((eager, None), (compiled, "default")):
        task = report.load_for_evaluation(ternary_checkpoint, params, "deterministic")
        assert task.model.recurrent.compile_mode == mode
    # the same function either way, so the same rounded perplexity up to float32 sums
    (rounded_eager,) = report.test_perplexities(
        ternary_checkpoint, eager, ptb_dir, TEST_BATCHES, "deterministic"
    )
    (rounded_fast,) = report.test_perplexities(
        ternary_checkpoint, compiled, ptb_dir, TEST_BATCHES, "deterministic"
    )
    assert rounded_fast == pytest.approx(rounded_eager, rel=1e-4)


def test_over_seeds_gives_each_seed_the_mean_and_the_sample_spread():
    summary = report.over_seeds({0: 110.0, 1: 112.0, 2: 114.0})
    assert summary == {"seeds": {"0": 110.0, "1": 112.0, "2": 114.0}, "mean": 112.0, "std": 2.0}
    assert report.over_seeds({3: 90.5}) == {"seeds": {"3": 90.5}, "mean": 90.5, "std": 0.0}


@pytest.mark.slow
def test_report_tests_every_training_seeds_model_and_writes_the_format_checks_read(
    tmp_path: Path, ptb_dir: Path
):
    seeds = [0, 3]
    params = _params(
        cells=["lstm"],
        training_seeds=seeds,
        report={"eval_seeds": [0, 1]},
        tracking={"enabled": False},
        train_ternary={"limit_eval_batches": TEST_BATCHES},
        train_fp={"limit_eval_batches": TEST_BATCHES},
    )
    runs = tmp_path / "runs"
    folders = [model_dir("fp", "lstm", runs=runs)]
    folders += [model_dir("ternary", "lstm", seed, runs) for seed in seeds]
    for index, folder in enumerate(folders):
        kind = "fp" if index == 0 else "ternary"
        save_briefly_trained(params, "lstm", kind, ptb_dir, folder / "model.ckpt", seed=index)
        (folder / "history.csv").write_text("epoch,train_ppl,val_ppl,lr\n1,900.0,950.0,10.0\n")

    results = report.report(params, runs, ptb_dir, tmp_path / "report")

    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert written == results
    ternary = written["lstm"]["ternary"]
    assert set(ternary["seeds"]) == set(ternary["rounded"]["seeds"]) == {"0", "3"}
    assert ternary["seeds"]["0"] != ternary["seeds"]["3"]  # two models, two figures
    assert ternary["mean"] == pytest.approx(sum(ternary["seeds"].values()) / 2, abs=1e-3)
    assert ternary["std"] > 0
    (fp,) = written["lstm"]["fp"]["seeds"].values()
    assert written["lstm"]["fp"]["mean"] == fp and written["lstm"]["fp"]["std"] == 0.0
    table = (tmp_path / "report" / "README.md").read_text()
    assert f"| LSTM | {fp:.1f} | {ternary['mean']:.1f} ± {ternary['std']:.1f} |" in table
    for seed in ("0", "3"):
        assert f"| LSTM | {seed} | {ternary['seeds'][seed]:.2f} ± " in table
    assert (tmp_path / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"
