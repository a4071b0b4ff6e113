"""docker-compose.yml under a real engine, driven by README's "Run it as a team" commands
word for word, on a smoke-size copy of the project: every stage runs in the `pipeline`
container, the sweeps on the ray-worker container. Meanwhile a ray-worker is killed
mid-sweep and the MLflow server stopped mid-training; then the runs are read back through
MLflow's REST API (with auth) and from PostgreSQL, and what the host can reach is checked.

The engine is the test's own (tests/stack/engine.py): CI has no Docker Hub, so the base
images are stand-ins made on the machine, passed through the compose file's variables."""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PTB_DIR, REPO_ROOT
from tests.pipeline.conftest import STAGES, make_smoke_project, write_params
from tests.pipeline.services import answers, free_port
from tests.stack.engine import (
    COMPOSE_PLUGIN,
    DOCKER_LINK,
    SYSTEM_CONTAINERD,
    Engine,
    NetworkState,
    build_stand_ins,
    containerd_config,
    dockerd_command,
    import_debian_base,
    missing_tools,
)

BASE_IMAGE = "hitnet-ci/debian:bookworm"
# Where docker-compose.yml mounts PTB from when .env leaves PTB_DIR at .env.example's value.
PTB_DEFAULT = re.search(
    r"\$\{PTB_DIR:-([^}]+)\}", (REPO_ROOT / "docker-compose.yml").read_text()
).group(1)
TORCH_WHEEL = "torch-2.13.0+cpu-*.whl"
PIPELINE_TIMEOUT_S = 1500
# A user's checkout belongs to the user, not to the containers' root (git's ownership check).
CHECKOUT_OWNER = 1000


def team_commands() -> list[str]:
    """The commands of README's "Run it as a team" block, comments dropped."""
    section = (REPO_ROOT / "README.md").read_text().split("## Run it as a team", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's 'Run it as a team' section has no bash block"
    lines = (line.split(" #")[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


def stdout_of(
    command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """What ``command`` prints; it must succeed."""
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, check=True
    ).stdout


def container_ids(project: Path, env: dict[str, str], *services: str) -> list[str]:
    """The running containers of the compose project (of ``services`` only, if given)."""
    return stdout_of(["docker", "compose", "ps", "-q", *services], project, env).split()


class Phases:
    """Wall time per phase, printed at the end: the budget in CI is tight."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.times.append((name, time.monotonic() - start))

    def table(self) -> str:
        rows = [f"  {seconds:7.1f} s  {name}" for name, seconds in self.times]
        total = sum(seconds for _, seconds in self.times)
        return "\n".join(["engine test phases:", *rows, f"  {total:7.1f} s  in all"])


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    missing = missing_tools()
    if missing:
        reason = (
            f"no container engine can be started here, missing: {', '.join(missing)} "
            "(.ci/engine-tools installs them)"
        )
        if os.environ.get("HITNET_REQUIRE_ENGINE"):
            pytest.fail(reason)
        pytest.skip(reason)
    # short: the daemon's socket path must fit a Unix socket name
    folder = Path(tempfile.mkdtemp(prefix="engine-", dir="/tmp"))
    started = Engine(folder)
    try:
        started.start()
        yield started
    finally:
        started.stop()
        shutil.rmtree(folder, ignore_errors=True)


def torch_wheels() -> list[Path]:
    """The CPU torch wheels in pip's find-links folders; fails when there is none: the image
    build would download torch from the index instead, which CI must not depend on."""
    folders = os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split()
    wheels = [wheel for folder in folders for wheel in sorted(Path(folder).glob(TORCH_WHEEL))]
    if not wheels:
        pytest.fail(
            f"no {TORCH_WHEEL} in {' '.join(folders)} (PIP_FIND_LINKS, else /opt/wheels): the "
            "stack's image would download torch from its index; put the wheel there"
        )
    return wheels


def smoke_checkout(project: Path) -> Path:
    """The smoke project as a team member's fresh clone: PTB beside it where .env.example's
    PTB_DIR and params.yaml's default say (a copy, mounted from there by the stack), trials
    long enough to be killed mid-sweep and a ternary stage long enough for an outage
    mid-training, the torch wheel pip would install."""
    wheels = torch_wheels()
    make_smoke_project(project)
    write_params(
        project,
        {
            "data": {"source": "../shared/data/ptb"},
            "tune": {"epochs": 3, "fail_at_epoch": None},  # the kill is this sweep's failure
            "train_ternary": {"epochs": 3},
        },
    )
    subprocess.run(["git", "commit", "-qam", "smoke params"], cwd=project, check=True)
    for wheel in wheels:
        shutil.copy(wheel, project / "docker" / "wheels")
    shutil.copytree(PTB_DIR, project / PTB_DEFAULT)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{CHECKOUT_OWNER}:{CHECKOUT_OWNER}", project], check=True)
    return project


def test_the_smoke_checkout_fails_fast_without_a_local_torch_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=re.escape(TORCH_WHEEL)):
        smoke_checkout(tmp_path / "project")
    assert not (tmp_path / "project").exists()  # before any copying


def test_the_engine_runs_on_a_containerd_of_its_own(tmp_path):
    command = dockerd_command(tmp_path, tmp_path / "containerd.sock")
    assert f"--containerd={tmp_path / 'containerd.sock'}" in command
    config = containerd_config(tmp_path)
    assert f'address = "{tmp_path}/' in config
    assert "/run/containerd" not in config and "/opt/containerd" not in config


def test_the_gpu_file_merges_gpu_requests_into_pipeline_and_ray_worker():
    """Compose's own merge of the two files (no daemon needed): every GPU reserved for the
    pipeline and the ray-worker, none for the other services."""
    if not COMPOSE_PLUGIN.is_file():
        reason = f"no Compose v2 plugin at {COMPOSE_PLUGIN} (.ci/engine-tools installs it)"
        if os.environ.get("HITNET_REQUIRE_ENGINE"):
            pytest.fail(reason)
        pytest.skip(reason)
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    merged = stdout_of(
        [
            *(str(COMPOSE_PLUGIN), "--env-file", ".env.example", "--profile", "run"),
            *("-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"),
            *("config", "--format", "json"),
        ],
        REPO_ROOT,
        env,
    )
    services = json.loads(merged)["services"]
    gpus = {
        name: service["deploy"]["resources"]["reservations"]["devices"]
        for name, service in services.items()
        if "deploy" in service
    }
    every_gpu = [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # -1: all
    assert gpus == {"pipeline": every_gpu, "ray-worker": every_gpu}


def run_with_faults(
    command: str, project: Path, env: dict[str, str], port: int
) -> tuple[str, tuple[int, int]]:
    """Runs README's pipeline command; kills the ray-worker container at the first trial
    epoch (then starts it again, as its owner would), stops the mlflow container at the
    first ternary epoch (then starts it again). Returns the output and the outage: from
    mlflow stopped to answering again, in epoch milliseconds as MLflow stamps metrics."""

    def compose(*args: str) -> None:
        subprocess.run(["docker", "compose", *args], cwd=project, env=env, check=True)

    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(PIPELINE_TIMEOUT_S, process.kill)
    watchdog.start()
    output, worker_killed, outage = [], False, None
    try:
        for line in process.stdout:
            output.append(line)
            if not worker_killed and re.match(r"tune@lstm trial \w+ epoch 1/", line):
                worker = container_ids(project, env, "ray-worker")
                subprocess.run(["docker", "kill", *worker], env=env, check=True)
                output.append(f"TEST: killed ray-worker {worker}\n")
                compose("start", "ray-worker")
                worker_killed = True
            if outage is None and re.match(r"train_ternary@lstm-0 epoch 1/", line):
                compose("stop", "mlflow")
                down = time.time()
                compose("start", "mlflow")
                while not answers(f"http://127.0.0.1:{port}/health"):
                    time.sleep(0.5)
                outage = (int(down * 1000), int(time.time() * 1000))
                output.append(f"TEST: mlflow stopped for {time.time() - down:.1f} s\n")
        process.wait()
    finally:
        watchdog.cancel()
    text = "".join(output)
    assert process.returncode == 0, text[-6000:]
    assert worker_killed and outage, text[-6000:]
    return text, outage


class MlflowRest:
    """MLflow's REST API on the published port, with or without basic auth."""

    def __init__(self, port: int, user: str | None, password: str | None) -> None:
        self.base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        self.auth = None
        if user is not None:
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base}/{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if self.auth:
            request.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, {}

    def ok(self, path: str, body: dict | None = None) -> dict:
        status, answer = self.call(path, body)
        assert status == 200, (path, status)
        return answer


def read_env(project: Path) -> dict[str, str]:
    lines = (project / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and line[:1] != "#")


def history_epochs(path: Path) -> list[int]:
    with path.open() as rows:
        return [int(row["epoch"]) for row in csv.DictReader(rows)]


def check_runs(project: Path, port: int, settings: dict[str, str], outage: tuple[int, int]) -> int:
    """Every stage's run on the server, finished, with every epoch its history.csv has (those
    that ended while the server was down too), the checkout's commit and its artifacts;
    returns the number of runs."""
    mlflow = MlflowRest(port, "admin", settings["MLFLOW_ADMIN_PASSWORD"])
    experiment = mlflow.ok("experiments/get-by-name?experiment_name=hitnet-ptb")["experiment"]
    runs = mlflow.ok(
        "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
    )["runs"]
    tags = [{tag["key"]: tag["value"] for tag in run["data"].get("tags", [])} for run in runs]
    assert {tag["dvc.stage"] for tag in tags} == set(STAGES)
    assert {run["info"]["status"] for run in runs} == {"FINISHED"}
    # the checkout is the user's: git must be told to trust it
    head = stdout_of(
        ["git", "-c", f"safe.directory={project}", "rev-parse", "HEAD"], project
    ).strip()
    for run, tag in zip(runs, tags, strict=True):
        stage = tag["dvc.stage"]
        if "git.commit" in tag:  # the stages' runs (a sweep's trials are Ray's)
            assert tag["git.commit"] == head, stage
        kind, _, name = stage.partition("@")
        if kind not in ("train_fp", "train_ternary"):
            continue
        cell, _, seed = name.partition("-")
        folder = f"runs/fp/{cell}" if kind == "train_fp" else f"runs/ternary/{cell}/seed{seed}"
        run_id = run["info"]["run_id"]
        history = mlflow.ok(f"metrics/get-history?run_id={run_id}&metric_key=val_ppl")
        steps = sorted(metric["step"] for metric in history["metrics"])
        assert steps == history_epochs(project / folder / "history.csv"), stage
        if stage == "train_ternary@lstm-0":  # the outage hit its training
            stamps = [metric["timestamp"] for metric in history["metrics"]]
            assert any(outage[0] <= stamp <= outage[1] for stamp in stamps), (stamps, outage)
        files = mlflow.ok(f"artifacts/list?run_id={run_id}").get("files", [])
        assert "metrics.json" in {file["path"] for file in files}, stage
    return len(runs)


def check_postgres(project: Path, env: dict[str, str], settings: dict[str, str], runs: int):
    def query(sql: str) -> int:
        answer = stdout_of(
            [
                *("docker", "compose", "exec", "-T", "postgres", "psql"),
                *("-U", settings["POSTGRES_USER"], "-d", settings["POSTGRES_DB"], "-tAc", sql),
            ],
            project,
            env,
        )
        return int(answer.strip())

    assert query("SELECT count(*) FROM runs WHERE status = 'FINISHED'") == runs
    assert query("SELECT count(*) FROM metrics WHERE key = 'val_ppl'") > 0


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses, the engine's bridges left out."""
    lines = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout.splitlines()
    return [
        line.split()[3].split("/")[0] for line in lines if not DOCKER_LINK.match(line.split()[1])
    ]


def check_exposure(project: Path, env: dict[str, str], settings: dict[str, str], port: int):
    """Only MLflow is published, on 127.0.0.1 only; it refuses calls without the password;
    no secret shows in `docker inspect` or in any command line on the host."""
    inspected = stdout_of(["docker", "inspect", *container_ids(project, env)], env=env)
    published = {
        (container["Name"], port_name, binding["HostIp"])
        for container in json.loads(inspected)
        for port_name, bindings in container["NetworkSettings"]["Ports"].items()
        for binding in bindings or []
    }
    assert {(port_name, ip) for _, port_name, ip in published} == {("5000/tcp", "127.0.0.1")}
    for address in host_addresses():  # the port is closed on every other address
        with pytest.raises(OSError), socket.create_connection((address, port), 3):
            pass
    assert MlflowRest(port, None, None).call("experiments/search?max_results=1")[0] == 401
    assert MlflowRest(port, "admin", "wrong").call("experiments/search?max_results=1")[0] == 401
    command_lines = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for name in (
        "POSTGRES_PASSWORD",
        "MLFLOW_ADMIN_PASSWORD",
        "MLFLOW_SECRET_KEY",
        "RAY_AUTH_TOKEN",
    ):
        assert settings[name] not in inspected, name
        assert settings[name] not in command_lines, name


def check_containers(project: Path, env: dict[str, str], engine: Engine) -> None:
    """After `up --wait`: every service healthy (the ray-worker's check: the head lists
    its node as alive), PTB mounted from the fresh clone's default place, and every
    container run by the engine's own containerd (its shim names the engine's folder)."""
    containers = json.loads(engine.docker("inspect", *container_ids(project, env)).stdout)
    services = {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in containers}
    assert services.keys() == {"postgres", "mlflow", "ray-head", "ray-worker"}
    for name, container in services.items():
        assert container["State"]["Health"]["Status"] == "healthy", name
        shim = Path(f"/proc/{container['State']['Pid']}/stat").read_text().rsplit(")", 1)[1]
        parent = Path(f"/proc/{shim.split()[1]}/cmdline").read_bytes()
        assert str(engine.folder).encode() in parent, (name, parent)
    mounts = {m["Destination"]: m["Source"] for m in services["ray-worker"]["Mounts"]}
    assert Path(mounts["/shared/data/ptb"]).resolve() == (project / PTB_DEFAULT).resolve()


def remove_volumes(project: Path, env: dict[str, str]) -> None:
    """The next run makes new secrets: its volumes must be new too (the layers are kept)."""
    subprocess.run(
        ["docker", "compose", "down", "-v"], cwd=project, env=env, capture_output=True, check=False
    )


@pytest.mark.slow
def test_readme_team_commands_run_the_pipeline_on_the_stack(engine, tmp_path, capsys):
    commands = team_commands()
    up, pipeline, down = (
        next(command for command in commands if marker in command)
        for marker in ("docker compose up --wait", "run --rm pipeline dvc repro", "compose down")
    )
    phases = Phases()
    project = smoke_checkout(tmp_path / "project")
    port = free_port()
    # PTB_DIR as a fresh clone's .env has it (.env.example's): none from this shell
    env = {**engine.env, "MLFLOW_PORT": str(port)}
    env.pop("PTB_DIR", None)
    try:
        with phases("base image: debootstrap minbase, docker import"):
            import_debian_base(engine, BASE_IMAGE)
        with phases("stand-ins for Docker Hub's python and postgres images"):
            env.update(build_stand_ins(engine, BASE_IMAGE))
        output, outage = "", None
        for command in commands:
            if command == down:
                assert outage, "README's commands stop the stack before they run the pipeline"
                with phases("checks: MLflow REST, PostgreSQL, ports, secrets"):
                    settings = read_env(project)
                    runs = check_runs(project, port, settings, outage)
                    check_postgres(project, env, settings, runs)
                    check_exposure(project, env, settings, port)
            with phases(command):
                if command == pipeline:
                    output, outage = run_with_faults(command, project, env, port)
                else:
                    done = subprocess.run(
                        ["bash", "-c", command], cwd=project, env=env, capture_output=True
                    )
                    assert done.returncode == 0, (
                        command,
                        (done.stdout + done.stderr)[-6000:].decode(),
                    )
            if command == up:
                check_containers(project, env, engine)
        assert "tune: joining the Ray cluster at ray-head:6379" in output
        assert re.search(r"tune@lstm trial \w+ failed: .*; retrying", output), output[-6000:]
        assert engine.docker("ps", "-aq").stdout.split() == []  # down left nothing
        with phases("engine stop, network cleanup"):
            remove_volumes(project, env)
            engine.stop()
        assert engine.leftover_processes() == []
        before, after = engine.network_before, NetworkState.now()
        assert (after.rules, after.chains, after.policies) == (
            before.rules,
            before.chains,
            before.policies,
        )
        assert (after.links, after.ip_forward) == (before.links, before.ip_forward)
        assert SYSTEM_CONTAINERD.exists() == engine.system_containerd_before
    finally:
        if engine.process is not None:
            remove_volumes(project, env)
        with capsys.disabled():
            print("\n" + phases.table())
