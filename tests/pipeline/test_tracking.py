"""MLflow wiring against a real SQLite store; an unreachable server fails before training."""

from __future__ import annotations

import base64
import http.server
import socket
import threading

import pytest
from mlflow import MlflowClient

from pipeline.params import Params
from pipeline.tracking import (
    StageRun,
    TrackingError,
    check_reachable,
    flatten,
    params_hash,
    redacted,
    tracking_uri,
)
from pipeline.train import train


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is


def test_tracking_uri_defaults_to_local_sqlite_in_the_project_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # a stage of `dvc exp run --temp` runs in a copy; DVC_ROOT names the workspace
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "workspace"))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/workspace/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_and_hash():
    values = {"quant": {"weight": "ttq", "activations": ["gates"]}, "seed": 0, "x": True}
    assert flatten(values) == {
        "quant.weight": "ttq",
        "quant.activations": '["gates"]',
        "seed": "0",
        "x": "true",
    }
    assert params_hash(values) == params_hash(dict(reversed(values.items())))
    assert params_hash(values) != params_hash({**values, "seed": 1})


def test_stage_run_records_params_tags_and_per_epoch_metrics(sqlite_uri):
    run = StageRun("exp", "train_fp@lstm", {"train_fp": {"lr": 20.0}, "seed": 0})
    run.log_metrics({"val_ppl": 120.0}, step=1)
    run.log_metrics({"val_ppl": 110.0}, step=2)
    run.finish()
    client = MlflowClient(tracking_uri=sqlite_uri)
    stored = client.get_run(run.run_id)
    assert stored.info.run_name == "train_fp@lstm" and stored.info.status == "FINISHED"
    assert stored.data.params == {"train_fp.lr": "20.0", "seed": "0"}
    assert stored.data.tags["dvc.stage"] == "train_fp@lstm"
    assert len(stored.data.tags["params.hash"]) == 12
    history = client.get_metric_history(run.run_id, "val_ppl")
    assert [(m.step, m.value) for m in history] == [(1, 120.0), (2, 110.0)]


def test_a_resumed_run_does_not_log_a_replayed_epoch_twice(sqlite_uri):
    first = StageRun("exp", "train_fp@gru", {})
    first.log_metrics({"val_ppl": 120.0}, step=1)
    first.log_metrics({"val_ppl": 110.0}, step=2)
    first.flush()  # epoch 2 reached the server, then the stage was killed before its checkpoint
    resumed = StageRun("exp", "train_fp@gru", {}, run_id=first.run_id)
    resumed.log_metrics({"val_ppl": 110.0}, step=2)  # the replayed epoch
    resumed.log_metrics({"val_ppl": 100.0}, step=3)
    resumed.finish()
    history = MlflowClient(tracking_uri=sqlite_uri).get_metric_history(first.run_id, "val_ppl")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_unreachable_tracking_server_fails_before_any_training(tmp_path, monkeypatch, ptb_dir):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = Params.model_validate({"data": {"max_tokens": 1000}})
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri}.*not reachable"):
        train(params, "lstm", "fp", ptb_dir, tmp_path / "out", work_root=tmp_path / "ck")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_tracking_disabled_trains_without_any_mlflow_store(tmp_path, monkeypatch, ptb_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = Params.model_validate(
        {
            "data": {"max_tokens": 4000},
            "model": {"embedding_size": 8, "hidden_size": 8},
            "train_fp": {"epochs": 1, "limit_train_batches": 2, "limit_eval_batches": 2},
            "hardware": {"accelerator": "cpu"},
            "tracking": {"enabled": False},
        }
    )
    metrics = train(params, "gru", "fp", ptb_dir, tmp_path / "out", work_root=tmp_path / "ck")
    assert metrics["epochs"] == 1 and (tmp_path / "out" / "metrics.json").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_stage_killed_before_its_first_checkpoint_goes_on_in_the_same_run(
    tmp_path, monkeypatch, ptb_dir, sqlite_uri
):
    """Fault: each such kill left a RUNNING run behind, and the rerun opened another."""
    monkeypatch.chdir(tmp_path)
    params = Params.model_validate(
        {
            "data": {"max_tokens": 4000},
            "model": {"embedding_size": 8, "hidden_size": 8},
            "train_fp": {"epochs": 1, "limit_train_batches": 2, "limit_eval_batches": 2},
            "hardware": {"accelerator": "cpu"},
        }
    )

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # before any epoch, so before any checkpoint

    with monkeypatch.context() as patch:
        patch.setattr("pipeline.train._fit_and_test", killed)
        with pytest.raises(KeyboardInterrupt):
            train(params, "gru", "fp", ptb_dir, tmp_path / "out", work_root=tmp_path / "ck")
    train(params, "gru", "fp", ptb_dir, tmp_path / "out", work_root=tmp_path / "ck")

    client = MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.get_experiment_by_name("hitnet-ptb")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and "test_ppl" in run.data.metrics


@pytest.fixture
def health_server_with_basic_auth():
    """A /health endpoint on loopback that answers only user "alice", password "s3cr:t@"."""
    expected = "Basic " + base64.b64encode(b"alice:s3cr:t@").decode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health" and self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_credentials_in_the_tracking_uri_are_sent_as_basic_auth_and_never_printed(
    health_server_with_basic_auth,
):
    port = health_server_with_basic_auth
    check_reachable(f"http://alice:s3cr%3At%40@127.0.0.1:{port}")  # answers: no error
    with pytest.raises(TrackingError) as caught:
        check_reachable(f"http://alice:wrong-pw@127.0.0.1:{port}")
    assert "wrong-pw" not in str(caught.value)
    assert f"http://alice:***@127.0.0.1:{port}" in str(caught.value)
    assert redacted("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_stalled_server_never_holds_up_the_caller(sqlite_uri):
    """Fault: MLflow's retries (minutes a call) ran in the training loop."""
    run = StageRun("exp", "train_fp@gru", {"seed": 0})
    stalled, send = threading.Event(), run.client.log_batch

    def stalls_until_released(*args, **kwargs):
        stalled.wait()
        return send(*args, **kwargs)

    run.client.log_batch = stalls_until_released
    epochs = threading.Thread(
        target=lambda: [run.log_metrics({"val_ppl": 100.0 - e}, step=e) for e in (1, 2, 3)]
    )
    epochs.start()
    epochs.join(timeout=30)
    assert not epochs.is_alive(), "log_metrics waited for the stalled server"
    stalled.set()  # the server answers again
    run.finish()
    client = MlflowClient(tracking_uri=sqlite_uri)
    history = client.get_metric_history(run.run_id, "val_ppl")
    assert sorted((m.step, m.value) for m in history) == [(1, 99.0), (2, 98.0), (3, 97.0)]
