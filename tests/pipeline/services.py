"""Real services for the tests, as local processes on 127.0.0.1: free ports, an MLflow
tracking server, stopping a process group for good, and Ray instances of the test's own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import tool_env


def free_port() -> int:
    """A port nothing listens on (the socket that found it is closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def start_mlflow_server(folder: Path, port: int, backend_store_uri: str) -> subprocess.Popen:
    """`mlflow server` with served artifacts under ``folder``; returns once /health answers."""
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri={backend_store_uri}",
            "--serve-artifacts",
            f"--artifacts-destination={folder / 'artifacts'}",
            f"--allowed-hosts=127.0.0.1:{port},localhost:{port}",
        ],
        env=tool_env(folder),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not answers(f"http://127.0.0.1:{port}/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            kill(server)
            raise AssertionError(f"mlflow server on port {port} did not come up")
        time.sleep(0.5)
    return server


def kill(process: subprocess.Popen) -> None:
    """SIGKILL to the whole process group: no goodbye, as when a machine dies."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def own_ray(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``env`` with a Ray temp folder of this test's own (``RAY_TMPDIR``); on exit, every
    process started with it, and only those, is killed by PID (Ray processes that other
    people started on this machine are left alone), and the folder is removed."""
    # short: Ray's socket paths under it must fit a Unix socket name (107 bytes)
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        yield {**env, "RAY_TMPDIR": folder}
    finally:
        stop_processes_started_with(f"RAY_TMPDIR={folder}")
        shutil.rmtree(folder, ignore_errors=True)  # its sessions' logs and sockets


# A driver holding up the local Ray the tune stage starts (token and all), printing its GCS
# address once it is up.
LOCAL_SWEEP_RAY = (
    "from pipeline.tune import connect_ray, guard_local_ray\n"
    "guard_local_ray()\n"
    "connect_ray()\n"
    "import ray, time\n"
    "print(ray.get_runtime_context().gcs_address, flush=True)\n"
    "time.sleep(600)\n"
)


def start_local_sweep_ray(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A local Ray as the tune stage starts it, in ``env`` (give it ``own_ray``'s): the
    driver holding it up and its GCS address. The caller ends the driver."""
    driver = subprocess.Popen(
        [sys.executable, "-c", LOCAL_SWEEP_RAY],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return driver, driver.stdout.readline().strip()


def processes_started_with(entry: str) -> list[int]:
    """PIDs whose environment, as the process started, holds ``entry`` ("NAME=value"):
    whatever a process with it started inherits it, Ray's workers included."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
    return found


def stop_processes_started_with(entry: str, timeout_s: float = 30) -> None:
    """SIGKILL to each, again until none is left (one may start another as it goes)."""
    deadline = time.monotonic() + timeout_s
    while pids := processes_started_with(entry):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes started with {entry} outlived SIGKILL: {pids}")
        time.sleep(0.2)
