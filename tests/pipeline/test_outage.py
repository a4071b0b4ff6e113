"""The tracking server dies in the middle of a training stage: training goes on, every metric
reaches DVC's files, the stage ends with an error naming the server and keeps its
checkpoints; once the server is back, a plain `dvc repro` puts every epoch in the same MLflow
run (fault: DVC once skipped the stage as unchanged and left the run RUNNING)."""

from __future__ import annotations

import subprocess
import time

import pytest
from mlflow import MlflowClient

from tests.pipeline.conftest import tool_env, write_params
from tests.pipeline.services import free_port, kill, start_mlflow_server


@pytest.mark.slow
def test_training_survives_a_tracking_server_outage(smoke_project, tmp_path):
    project = smoke_project
    write_params(project, {"train_fp": {"epochs": 3, "limit_train_batches": 40}})
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {
        **tool_env(project),
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # fail fast in the test; default: retry
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    server = start_mlflow_server(tmp_path, port, backend)
    try:
        subprocess.run(
            ["dvc", "repro", "prepare"], cwd=project, env=env, check=True, capture_output=True
        )
        history = project / "runs" / "fp" / "lstm" / "history.csv"
        log = tmp_path / "train.log"
        with log.open("w") as out:
            training = subprocess.Popen(
                ["dvc", "repro", "--single-item", "train_fp@lstm"],
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 240
        while not (history.is_file() and len(history.read_text().splitlines()) >= 2):
            assert training.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        kill(server)
        assert training.wait(timeout=600) != 0
        output = log.read_text()
        assert f"MLflow at {uri} failed" in output  # warned, and went on training
        assert "could not log" in output and uri in output  # then a clear error at the end
        assert len(history.read_text().splitlines()) == 1 + 3  # every epoch reached DVC's file
        assert (project / "runs" / "fp" / "lstm" / "metrics.json").is_file()
        assert list((project / "checkpoints").glob("train_fp-lstm-*/last.ckpt"))  # kept

        server = start_mlflow_server(tmp_path, port, backend)  # back, with its store
        rerun = subprocess.run(
            ["dvc", "repro", "train_fp@lstm"], cwd=project, env=env, capture_output=True, text=True
        )
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "resuming from" in rerun.stdout
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("hitnet-ptb")
        (run,) = client.search_runs(
            [experiment.experiment_id], "tags.`dvc.stage` = 'train_fp@lstm'"
        )
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_ppl"))
        assert steps == [1, 2, 3] and run.info.status == "FINISHED"
        assert "test_ppl" in run.data.metrics
    finally:
        kill(server)
