"""MLflow's model registry: every trained model as a logged MLflow model with a signature
(token ids -> next-token logits), registered as ``hitnet-<kind>-<cell>``, one version per
training run, tagged with its training seed, BTQ evaluation mode, perplexities and the sha256
of its ``model.ckpt``. The report moves the alias ``best`` to the version of the lowest
validation perplexity among the models it reports (chosen on validation, never on test).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from pathlib import Path

import hitnet

BEST_ALIAS = "best"


def registered_name(kind: str, cell: str) -> str:
    return f"hitnet-{kind}-{cell}"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def log_registered_model(
    tracking_uri: str,
    run_id: str,
    checkpoint: Path,
    name: str,
    tags: Mapping[str, str],
) -> str:
    """Logs ``checkpoint`` as the run's MLflow model, registers it as ``name``; the version."""
    import mlflow  # here: an untracked stage never needs mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    vocab_size = saved["hyper_parameters"]["model"]["vocab_size"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, vocab_size))]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    # The fluent API logs into the stage's own run, and ends it on leaving: this is the
    # stage's last step (StageRun.finish then flushes and closes it again).
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the signature is given: an input example would only load the model once more
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("served_model.py")),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(hitnet.__file__).parent)],
            signature=signature,
            # given, not inferred: inferring loads the model in a subprocess, for seconds
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            registered_model_name=name,
        )
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    version = str(info.registered_model_version)
    for key, value in {**tags, "model.sha256": file_sha256(checkpoint)}.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def set_best(
    tracking_uri: str, name: str, val_ppl_by_checkpoint: Mapping[Path, float]
) -> str | None:
    """Moves ``name``'s alias ``best`` to the registered version of the checkpoint with the
    lowest validation perplexity (found by the sha256 of its bytes); that version, or None
    (with a warning) when that model was never registered in this store."""
    from mlflow import MlflowClient

    best = min(val_ppl_by_checkpoint, key=val_ppl_by_checkpoint.__getitem__)
    sha = file_sha256(best)
    client = MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    matching = [v for v in versions if v.tags.get("model.sha256") == sha]
    if not matching:  # trained untracked, or into another store: the report still stands
        print(
            f"warning: {best} is not a registered version of {name}; alias {BEST_ALIAS!r} "
            "left as it was",
            flush=True,
        )
        return None
    version = str(max(matching, key=lambda v: int(v.version)).version)
    client.set_registered_model_alias(name, BEST_ALIAS, version)
    return version
