"""docker/entrypoint.py (secrets as files, into the command's environment) and
docker/new_env.py (.env with fresh secrets), without a container engine."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from tests.conftest import REPO_ROOT


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = _load("entrypoint")
new_env = _load("new_env")


@pytest.mark.parametrize("value", ["", "change-me", "change-me\n"])
def test_an_empty_or_placeholder_secret_stops_the_service_naming_it(tmp_path, value):
    (tmp_path / "postgres_password").write_text("fine")
    (tmp_path / "ray_auth_token").write_text(value)
    with pytest.raises(SystemExit, match=r"secret ray_auth_token .*RAY_AUTH_TOKEN in \.env"):
        entrypoint.read_secrets(tmp_path)


def test_secrets_are_read_without_their_line_end(tmp_path):
    (tmp_path / "mlflow_admin_password").write_text("s3cret\n")
    assert entrypoint.read_secrets(tmp_path) == {"mlflow_admin_password": "s3cret"}
    assert entrypoint.read_secrets(tmp_path / "absent") == {}


@given(password=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1))
def test_any_password_survives_the_store_uri(password):
    uri = entrypoint.postgres_uri("ml flow", password, "postgres:5432", "mlflow")
    parsed = make_url(uri)
    assert (parsed.username, parsed.password, parsed.host, parsed.port, parsed.database) == (
        "ml flow",
        password,
        "postgres",
        5432,
        "mlflow",
    )


def test_the_secrets_go_to_the_commands_environment_only():
    environ = {"POSTGRES_USER": "mlflow", "POSTGRES_DB": "mlflow", "PATH": "/bin"}
    secrets = {
        "postgres_password": "a@b:c/d",
        "mlflow_admin_password": "pw",
        "mlflow_secret_key": "k",
    }
    env = entrypoint.command_env(secrets, environ)
    assert make_url(env["MLFLOW_BACKEND_STORE_URI"]).password == "a@b:c/d"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_TRACKING_PASSWORD"] == "pw"
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "k"
    assert "MLFLOW_BACKEND_STORE_URI" not in environ  # the caller's mapping is left alone
    assert entrypoint.command_env({}, environ) == environ


def test_joining_ray_needs_an_address():
    with pytest.raises(SystemExit, match="RAY_ADDRESS"):
        entrypoint.join_ray({})


def test_new_env_replaces_every_placeholder_with_a_secret_of_its_own():
    template = (REPO_ROOT / ".env.example").read_text()
    filled = new_env.filled(template)
    values = dict(_assignments(filled))
    assert "change-me" in dict(_assignments(template)).values()
    assert "change-me" not in values.values()
    secrets = [values[name] for name, value in _assignments(template) if value == "change-me"]
    assert len(set(secrets)) == len(secrets)
    assert all(set(value) & set("@:/") for name, value in values.items() if "PASSWORD" in name)
    assert not any(set(value) & set("$#'\" ") for value in secrets)  # .env would read them
    kept = {name: value for name, value in _assignments(template) if value != "change-me"}
    assert kept.items() <= values.items()


def _assignments(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in text.splitlines() if line and line[0] != "#"]


def test_new_env_keeps_an_existing_env(tmp_path):
    (tmp_path / ".env.example").write_text("A_PASSWORD=change-me\n")
    new_env.main(tmp_path)
    written = (tmp_path / ".env").read_text()
    assert written.startswith("A_PASSWORD=") and "change-me" not in written
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0  # only its owner reads it
    new_env.main(tmp_path)
    assert (tmp_path / ".env").read_text() == written
