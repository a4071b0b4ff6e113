"""The services docker-compose.yml runs, started as local processes on 127.0.0.1 (CI has no
Docker engine): PostgreSQL, `mlflow server` on it with served artifacts, a Ray head and a
worker. The smoke pipeline runs against them; every stage's run must be on the server."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from mlflow import MlflowClient

from tests.pipeline.conftest import STAGES, make_smoke_project, tool_env
from tests.pipeline.services import free_port, kill, own_ray, start_mlflow_server

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


def _as_postgres(*command: str) -> list[str]:
    # PostgreSQL refuses to run as root: the Debian package's user runs it.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    if PG_BIN is None:
        pytest.fail("PostgreSQL server binaries not found (.ci/run installs Debian's postgresql)")
    # Not under pytest's root-only tmp folders: the postgres user must reach this one.
    folder = Path(tempfile.mkdtemp(prefix="hitnet-pg-"))
    data = folder / "data"
    port = free_port()
    password = secrets.token_hex(8)
    (folder / "pw").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "pw", "postgres")
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(data),
            "-U",
            "mlflow",
            f"--pwfile={folder / 'pw'}",
            "-A",
            "scram-sha-256",
        ),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
            "start",
        ),
        check=True,
        capture_output=True,
    )
    try:
        connection = psycopg2.connect(
            host="127.0.0.1", port=port, user="mlflow", password=password, dbname="postgres"
        )
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = start_mlflow_server(folder, port, postgres)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        kill(server)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("ray")
    env = {**tool_env(folder), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    address = f"127.0.0.1:{free_port()}"
    host, port = address.split(":")
    commands = [
        [
            "ray",
            "start",
            "--head",
            f"--node-ip-address={host}",
            f"--port={port}",
            "--num-cpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        ["ray", "start", f"--address={address}", f"--node-ip-address={host}", "--num-cpus=2"],
    ]
    with own_ray(env) as env:
        for command in commands:
            started = subprocess.run(command, env=env, capture_output=True, text=True)
            assert started.returncode == 0, started.stdout + started.stderr
        yield address, env


@pytest.mark.slow
def test_pipeline_records_every_stage_on_the_tracking_server_and_in_postgres(
    tmp_path, postgres, mlflow_server, ray_cluster
):
    address, env = ray_cluster
    project = make_smoke_project(tmp_path / "project")
    run_env = {**env, "MLFLOW_TRACKING_URI": mlflow_server, "RAY_ADDRESS": address}
    repro = subprocess.run(
        ["dvc", "repro"], cwd=project, env=run_env, capture_output=True, text=True
    )
    assert repro.returncode == 0, (repro.stdout + repro.stderr)[-4000:]
    assert not (project / "mlflow.db").exists()  # nothing went to the local default store
    assert f"joining the Ray cluster at {address}" in repro.stdout

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("hitnet-ptb")
    runs = client.search_runs([experiment.experiment_id])
    stages = {run.data.tags["dvc.stage"] for run in runs}
    assert stages == set(STAGES)
    for run in runs:
        if run.data.tags["dvc.stage"].startswith("train_"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_ppl")] == [1, 2]
            assert "test_ppl" in run.data.metrics
            # artifacts go through the server (--serve-artifacts) and come back whole
            local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
            assert Path(local).read_text().strip().startswith("{")

    dsn = postgres.replace("+psycopg2", "")
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'")
        assert cursor.fetchone()[0] == len(runs)
        cursor.execute("SELECT count(*) FROM metrics WHERE key = 'val_ppl'")
        assert cursor.fetchone()[0] > 0
