"""MLflow's model registry: a trained model logged with its signature, served as it scores,
registered per kind and cell, and the alias `best` on the lowest validation perplexity."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from hitnet.language_model import ModelConfig
from hitnet.lightning_module import LanguageModelTask
from hitnet.quantizers import QuantConfig
from pipeline.model_registry import BEST_ALIAS, registered_name
from pipeline.tracking import StageRun

VOCAB = 40


def _checkpoint(path: Path, seed: int) -> Path:
    """A small ternary model saved as the training stage saves one."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB,
        embedding_size=8,
        hidden_size=8,
        quant=QuantConfig(weight="ttq", activation="btq"),
        lambda_sigma=2.0,
    )
    task = LanguageModelTask(config)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def test_a_registered_model_serves_the_rounded_models_logits_with_its_signature(
    tmp_path, sqlite_uri
):
    checkpoint = _checkpoint(tmp_path / "model.ckpt", seed=0)
    name = registered_name("ternary", "lstm")
    with StageRun("exp", "train_ternary@lstm-0", {}) as run:
        version = run.log_registered_model(checkpoint, name, {"seed": "0", "btq_eval": "rounded"})
    client = MlflowClient(tracking_uri=sqlite_uri)
    stored = client.get_model_version(name, version)
    assert stored.tags["seed"] == "0" and stored.tags["btq_eval"] == "rounded"
    assert len(stored.tags["model.sha256"]) == 64
    assert client.get_run(run.run_id).info.status == "FINISHED"

    served = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    signature = served.metadata.signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "int64"
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, -1, VOCAB)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(7, 3), dtype=np.int64)
    logits = served.predict(tokens)
    saved = torch.load(checkpoint, weights_only=True)
    rounded = LanguageModelTask(
        ModelConfig.from_dict(saved["hyper_parameters"]["model"]).evaluated_as("deterministic")
    )
    rounded.load_state_dict(saved["state_dict"])
    expected, _ = rounded.model.eval()(torch.from_numpy(tokens))
    np.testing.assert_allclose(logits, expected.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(served.predict(tokens), logits)  # rounded: no draws


def test_best_follows_the_lowest_validation_perplexity_and_skips_unregistered_models(
    tmp_path, sqlite_uri, capsys
):
    name = registered_name("ternary", "gru")
    paths = [_checkpoint(tmp_path / f"seed{seed}.ckpt", seed) for seed in (0, 1, 2)]
    with StageRun("exp", "train", {}) as run:
        versions = [run.log_registered_model(path, name, {}) for path in paths[:2]]
    client = MlflowClient(tracking_uri=sqlite_uri)
    with StageRun("exp", "report", {}) as run:
        assert run.set_best(name, {paths[0]: 120.0, paths[1]: 110.0}) == versions[1]
        assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == versions[1]
        assert run.set_best(name, {paths[0]: 100.0, paths[1]: 110.0}) == versions[0]
        assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == versions[0]
        assert run.set_best(name, {paths[2]: 90.0, paths[0]: 100.0}) is None  # never registered
    assert "seed2.ckpt is not a registered version" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == versions[0]


def test_the_data_goes_in_as_dataset_inputs_with_their_sha256(tmp_path, sqlite_uri, ptb_dir):
    files = {"train": ptb_dir / "ptb.train.txt", "validation": ptb_dir / "ptb.valid.txt"}
    with StageRun("exp", "train_fp@lstm", {}) as run:
        run.log_dataset(files)
    inputs = MlflowClient(tracking_uri=sqlite_uri).get_run(run.run_id).inputs.dataset_inputs
    logged = {i.dataset.name: {t.key: t.value for t in i.tags} for i in inputs}
    assert logged["ptb.train.txt"]["mlflow.data.context"] == "train"
    sha = hashlib.sha256(files["validation"].read_bytes()).hexdigest()
    assert logged["ptb.valid.txt"]["sha256"] == sha


def test_system_metrics_are_sampled_into_the_run_while_it_is_open(sqlite_uri):
    with StageRun("exp", "train_fp@lstm", {}, system_metrics_interval_s=0.2) as run:
        time.sleep(1.5)
    metrics = MlflowClient(tracking_uri=sqlite_uri).get_run(run.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics
