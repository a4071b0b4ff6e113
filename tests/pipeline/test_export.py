"""The export stage: picks a seed on validation, writes a file that scores as its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hitnet.lightning_module import LanguageModelTask
from hitnet.packed import load_packed, vocabulary_sha256
from pipeline import export, report
from pipeline.builders import datamodule_for, model_dir
from pipeline.params import Params
from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import SMOKE, deep_update, save_briefly_trained

VAL_PPL = {0: 300.0, 1: 250.0}  # seed 1 validates best


def _params() -> Params:
    changes = {
        "training_seeds": list(VAL_PPL),
        "quant": {"btq_eval": "deterministic"},  # as params.yaml: the checkpoints round BTQ
        "tracking": {"enabled": False},
    }
    return Params.model_validate(deep_update(SMOKE, changes))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, ptb_dir: Path) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    for seed in VAL_PPL:
        folder = model_dir("ternary", "lstm", seed, runs)
        save_briefly_trained(_params(), "lstm", "ternary", ptb_dir, folder / "model.ckpt", seed)
        (folder / "metrics.json").write_text(json.dumps({"val_ppl": VAL_PPL[seed]}))
    return runs


def test_export_writes_the_best_validation_seeds_model_scoring_as_its_checkpoint(
    runs: Path, ptb_dir: Path, tmp_path: Path
):
    params = _params()
    sizes = export.export(params, "lstm", runs, ptb_dir, tmp_path)
    assert sizes["seed"] == 1 and sizes["val_ppl"] == {"0": 300.0, "1": 250.0}
    assert json.loads((tmp_path / "size.json").read_text()) == sizes
    # the report's rounded figure for that checkpoint, and the file's: one number
    checkpoint = model_dir("ternary", "lstm", 1, runs) / "model.ckpt"
    limit = params.recipe("ternary", "lstm").limit_eval_batches
    (rounded,) = report.test_perplexities(checkpoint, params, ptb_dir, limit, "deterministic")
    assert sizes["test_ppl_rounded"] == {"checkpoint": rounded, "file": rounded}

    packed = load_packed(tmp_path / "model.hitnet")
    datamodule = datamodule_for(params, ptb_dir)
    datamodule.setup()
    assert packed.header["vocabulary_sha256"] == vocabulary_sha256(datamodule.corpus.vocab)
    tokens = datamodule.corpus.test[:60].view(6, 10)
    with torch.no_grad():
        got, _ = packed.model(tokens)
        for seed, same in ((1, True), (0, False)):  # seed 1's weights, not seed 0's
            path = model_dir("ternary", "lstm", seed, runs) / "model.ckpt"
            trained = LanguageModelTask.load_from_checkpoint(path, map_location="cpu").model
            expected, _ = trained.eval()(tokens)
            assert torch.equal(got, expected) == same
    # 16-unit LSTM: W_ih, W_hh 64x16 each -> 2 x 256 bytes of codes, 2 scales of 4 bytes
    assert sizes["parts"]["recurrent_weights"] == {"bytes": 520, "fp32_bytes": 8192}
    assert sizes["file_bytes"] == (tmp_path / "model.hitnet").stat().st_size
    assert next(iter(sizes["rest"])) in ("embedding", "decoder_weight")


def test_a_model_not_trained_yet_is_one_line_naming_it(runs: Path, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "gru", "--runs", str(runs)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    missing = model_dir("ternary", "gru", 0, runs) / "model.ckpt"
    assert result.stderr == (
        f"error: {missing}: no trained ternary model there (run `dvc repro "
        "train_ternary@gru-0` first)\n"
    )
