"""docker-compose.yml, checked as a file (CI has no Docker engine): images build from what
exists, variables are documented, ports stay on loopback, GPUs are reserved, services are
health-checked and their commands exist in the image."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.conftest import REPO_ROOT

COMPOSE_TEXT = (REPO_ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
DOCKERFILE = (REPO_ROOT / "docker" / "Dockerfile").read_text()
# What each command needs in the project image: the package of pyproject that provides it.
COMMAND_PACKAGES = {"mlflow": "mlflow", "ray": "ray[tune]", "dvc": "dvc"}


def _command_words(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else command


def test_every_service_has_an_image_or_an_existing_build_context():
    for name, service in SERVICES.items():
        build = service.get("build")
        if build is None:
            assert "image" in service, name
            continue
        assert (REPO_ROOT / build["context"]).is_dir(), name
        assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file(), name


def test_every_variable_is_documented_in_env_example():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_TEXT))
    documented = set(
        re.findall(r"^([A-Z_][A-Z0-9_]*)=", (REPO_ROOT / ".env.example").read_text(), re.M)
    )
    assert used, "no variables found: the pattern is wrong"
    assert used <= documented, used - documented


def test_no_secret_is_written_in_the_file():
    postgres = SERVICES["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"].startswith("${")
    assert "RAY_AUTH_TOKEN: ${" in COMPOSE_TEXT


def test_published_ports_bind_to_loopback_and_ray_internals_stay_unpublished():
    published = [(name, port) for name, s in SERVICES.items() for port in s.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)
        container_port = str(port).rsplit(":", 1)[-1]
        assert container_port not in {"6379", "10001", "8000"}, (name, port)  # GCS, client, jobs


def test_workers_reserve_gpus_and_have_shared_memory():
    devices = SERVICES["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    for name in ("ray-head", "ray-worker"):
        assert "shm_size" in SERVICES[name], name


@pytest.mark.parametrize("name", ["postgres", "mlflow", "ray-head"])
def test_long_lived_services_are_health_checked(name):
    assert SERVICES[name]["healthcheck"]["test"]


def test_mlflow_waits_for_a_healthy_postgres_and_uses_it():
    mlflow = SERVICES["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = " ".join(_command_words(mlflow["command"]))
    assert "--backend-store-uri=postgresql+psycopg2://" in command
    assert "--allowed-hosts=" in command and "--cors-allowed-origins=" in command
    assert "--serve-artifacts" in command


def test_service_commands_exist_in_the_image():
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    installed = {re.split(r"[=<>]", dep)[0] for dep in dependencies}
    assert "pip install --no-cache-dir -e ." in DOCKERFILE  # the project and its dependencies
    for name, service in SERVICES.items():
        if "build" not in service:
            continue
        program = _command_words(service["command"])[0]
        assert COMMAND_PACKAGES[program] in installed, (name, program)
        healthcheck = service.get("healthcheck", {}).get("test", [])
        if "curl" in healthcheck:
            assert "curl" in DOCKERFILE, name
    assert "psycopg2-binary" in DOCKERFILE  # MLflow's PostgreSQL driver
