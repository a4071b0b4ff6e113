"""MLflow wiring: one run per stage execution, per-epoch metrics with step = epoch.

The store is ``sqlite:///mlflow.db`` in the project root unless ``MLFLOW_TRACKING_URI``
names another (a tracking server, say). A server that cannot be reached is an error at stage
start, before any training. During training a failed MLflow call does not stop the run: the
metrics are on disk already (DVC's files) and the call is retried at the next epoch and at
the end, where a server still down is an error that names it.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.model_registry import log_registered_model, set_best
from pipeline.params import TrackingParams, project_root

REACHABILITY_TIMEOUT_S = 10


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names its URI."""


def default_tracking_uri() -> str:
    """``mlflow.db`` in the project root, absolute: the same store from a DVC experiment's
    temporary copy (project_root)."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def redacted(uri: str) -> str:
    """``uri`` fit to print: a password in it (``http://user:secret@host``) becomes ``***``."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def check_reachable(uri: str) -> None:
    """Fails fast, naming the URI (never its password), when a tracking server does not
    answer its health check. Credentials in the URI go as HTTP basic auth, as MLflow's
    client sends them, not as part of the address."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    health = urllib.parse.urlunsplit(
        parts._replace(netloc=host, path=f"{parts.path.rstrip('/')}/health")
    )
    request = urllib.request.Request(health)
    if parts.username is not None:
        user, password = (
            urllib.parse.unquote(part or "") for part in (parts.username, parts.password)
        )
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=REACHABILITY_TIMEOUT_S):
            pass
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise TrackingError(
            f"MLflow tracking server {redacted(uri)} (MLFLOW_TRACKING_URI) is not reachable: "
            f"{error}. Start it, or unset MLFLOW_TRACKING_URI to use the local "
            "sqlite:///mlflow.db."
        ) from None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | bool) else str(value)
    return flat


def params_hash(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


class StageRun:
    """An MLflow run for one stage execution; ``run_id`` lets a resumed stage continue it."""

    def __init__(
        self,
        experiment: str,
        stage: str,
        params: Mapping[str, Any],
        run_id: str | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        system_metrics_interval_s: float | None = None,
    ) -> None:
        from mlflow import MlflowClient  # here: an untracked run never needs mlflow installed

        self.uri = tracking_uri()
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self._pending: list = []
        self._logged: set[tuple[str, int]] = set()
        # Metrics go to the server from a thread of their own: a slow or stalled server
        # never holds up training (MLflow's client retries a call for minutes by default).
        self._sending = threading.Lock()  # one sender at a time: no batch goes twice
        self._queue = threading.Lock()  # guards _pending: held for list edits only
        self._wake = threading.Event()
        self._closed = False  # set when the run ends: the sender thread then stops
        self._sender = threading.Thread(target=self._send_in_background, daemon=True)
        self._sender.start()
        self._system_metrics = None
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self._logged = self._logged_steps()
        else:
            self._create_run(experiment, stage, params, parent_run_id, run_name)
        if system_metrics_interval_s is not None:
            self._start_system_metrics(system_metrics_interval_s, resumed=run_id is not None)

    def _create_run(
        self,
        experiment: str,
        stage: str,
        params: Mapping[str, Any],
        parent_run_id: str | None,
        run_name: str | None,
    ) -> None:
        commit = git_commit()
        tags = {
            "dvc.stage": stage,
            "git.commit": commit,
            "params.hash": params_hash(params),
            # what the MLflow UI shows in its User and Source columns
            "mlflow.user": getpass.getuser(),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": f"dvc repro {stage}",
            "mlflow.source.git.commit": commit,
        }
        if parent_run_id is not None:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(
            self._experiment_id(experiment), run_name=run_name or stage, tags=tags
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        flat = [Param(key, value) for key, value in flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=flat[start : start + 100])

    def _start_system_metrics(self, interval_s: float, resumed: bool) -> None:
        """CPU, memory and (with nvidia-ml-py) GPU use, sampled by MLflow's own monitor in
        a thread of its own, as the run's ``system/...`` metrics."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_metrics = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=interval_s,
            resume_logging=resumed,
            tracking_uri=self.uri,
        )
        self._system_metrics.start()

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # The local store's artifacts beside it, not under the working directory (MLflow's
        # default), which a DVC experiment's temporary copy deletes.
        local = self.uri == default_tracking_uri()
        return self.client.create_experiment(
            name, artifact_location=(project_root() / "mlruns").as_uri() if local else None
        )

    def _logged_steps(self) -> set[tuple[str, int]]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {
            (key, metric.step)
            for key in keys
            for metric in self.client.get_metric_history(self.run_id, key)
        }

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queues the metrics for the background sender; returns at once, never raises.

        A resumed run replays the epochs after its last checkpoint; resume is exact, so a
        (key, step) the interrupted run already logged is not logged twice.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = {key: v for key, v in metrics.items() if (key, step) not in self._logged}
        with self._queue:
            self._pending += [Metric(key, float(v), now, step) for key, v in fresh.items()]
        self._logged |= {(key, step) for key in fresh}
        self._wake.set()

    def _send_pending(self) -> None:
        """Sends what is queued; what fails stays queued. Raises the transport's error."""
        with self._sending:
            with self._queue:
                batch = list(self._pending)
            for start in range(0, len(batch), 1000):
                chunk = batch[start : start + 1000]
                self.client.log_batch(self.run_id, metrics=chunk)
                with self._queue:  # only this sender removes, from the front
                    del self._pending[: len(chunk)]

    def _send_in_background(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            try:
                self._send_pending()
            except Exception as error:  # any transport or server error: kept, sent later
                print(
                    f"warning: MLflow at {redacted(self.uri)} failed ({error}); will retry",
                    flush=True,
                )

    def flush(self) -> None:
        """Sends everything queued now; a server still failing is an error naming it."""
        try:
            self._send_pending()
        except Exception as error:
            raise TrackingError(
                f"could not log {len(self._pending)} metric values to MLflow at "
                f"{redacted(self.uri)}: {error}"
            ) from error

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, files: Mapping[str, Path]) -> None:
        """The data as the run's inputs, one per split ({context: file}), with their sha256."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for context, path in files.items():
            sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            source = LocalArtifactDatasetSource(Path(path).resolve().as_uri())
            # MLflow keeps at most 36 characters of a digest: the whole sha256 goes in a tag
            dataset = MetaDataset(source, name=Path(path).name, digest=sha[:32])
            tags = [InputTag("mlflow.data.context", context), InputTag("sha256", sha)]
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
        # Stages running at once register the same dataset: the store's get-or-create can
        # lose that race (a unique-key error), and a second try then finds it.
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as error:
                if attempt == 2:
                    print(f"warning: the dataset inputs were not logged ({error})", flush=True)
                time.sleep(0.5 * (attempt + 1))

    def log_registered_model(self, checkpoint: Path, name: str, tags: Mapping[str, str]) -> str:
        return log_registered_model(self.uri, self.run_id, checkpoint, name, tags)

    def set_best(self, name: str, val_ppl_by_checkpoint: Mapping[Path, float]) -> str:
        return set_best(self.uri, name, val_ppl_by_checkpoint)

    def finish(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status="FINISHED")

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        """An exception marks the run FAILED (best effort) and goes on; success finishes it."""
        try:
            if error_type is None:
                self.finish()
                return
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, status="FAILED")
        finally:
            self._closed = True
            self._wake.set()
            if self._system_metrics is not None:
                self._system_metrics.finish()


class UntrackedRun:
    """Stands in for ``StageRun`` when ``tracking.enabled`` is false: DVC's files only."""

    run_id = "untracked"

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, files: Mapping[str, Path]) -> None:
        pass

    def log_registered_model(self, checkpoint: Path, name: str, tags: Mapping[str, str]) -> None:
        pass

    def set_best(self, name: str, val_ppl_by_checkpoint: Mapping[Path, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def __enter__(self) -> UntrackedRun:
        return self

    def __exit__(self, *_: object) -> None:
        pass


def stage_run(
    tracking: TrackingParams,
    stage: str,
    params: Mapping[str, Any],
    run_id: str | None = None,
) -> StageRun | UntrackedRun:
    if not tracking.enabled:
        return UntrackedRun()
    return StageRun(
        tracking.experiment,
        stage,
        params,
        run_id=run_id,
        system_metrics_interval_s=tracking.system_metrics_interval_s,
    )


@contextlib.contextmanager
def resumable_stage_run(
    tracking: TrackingParams, stage: str, params: Mapping[str, Any], run_id_file: Path
) -> Iterator[StageRun | UntrackedRun]:
    """``stage_run`` that goes on with the run an interrupted attempt opened (its id is kept
    in ``run_id_file``), even one killed before it saved anything: a rerun never leaves an
    orphan RUNNING run behind in MLflow."""
    earlier = run_id_file.read_text().strip() if run_id_file.is_file() else None
    run_id = None if earlier == UntrackedRun.run_id else earlier
    with stage_run(tracking, stage, params, run_id=run_id) as run:
        run_id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run.run_id)
        yield run
