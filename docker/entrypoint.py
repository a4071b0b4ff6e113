"""Every service built from docker/Dockerfile starts here, then runs its command.

Secrets come as files, /run/secrets/<name> (compose `secrets:`), never as environment or
command line, which `docker inspect` and `ps` show. This passes the ones a command needs in
that command's own environment, and stops the service, naming the secret, when one is empty
or still .env.example's placeholder.

``--join-ray`` (the pipeline service): first starts a Ray node in this container, joined to
``RAY_ADDRESS``'s cluster and offering no CPU or GPU to trials: a Ray driver must run on a
node of the cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

SECRETS = Path("/run/secrets")
PLACEHOLDER = "change-me"  # what .env.example holds for every secret


def read_secrets(folder: Path) -> dict[str, str]:
    """Each file in ``folder`` by name; exits naming the first empty or placeholder one."""
    found = {}
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        value = path.read_text().strip("\r\n")
        if value in ("", PLACEHOLDER):
            sys.exit(
                f"secret {path.name} is empty or the placeholder {PLACEHOLDER!r}: set "
                f"{path.name.upper()} in .env (python3 docker/new_env.py writes fresh ones)"
            )
        found[path.name] = value
    return found


def postgres_uri(user: str, password: str, host: str, database: str) -> str:
    """SQLAlchemy's URI for MLflow's store; every part quoted, so "@", ":" or "/" in the
    password stays the password."""
    quoted = [urllib.parse.quote(part, safe="") for part in (user, password, database)]
    return f"postgresql+psycopg2://{quoted[0]}:{quoted[1]}@{host}/{quoted[2]}"


def command_env(secrets: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` plus what the secrets give the command: MLflow's admin password to the
    server (first start) and to the clients; the store's URI and the CSRF key to the server."""
    env = dict(environ)
    if "mlflow_admin_password" in secrets:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = secrets["mlflow_admin_password"]
        env["MLFLOW_TRACKING_PASSWORD"] = secrets["mlflow_admin_password"]
    if "mlflow_secret_key" in secrets:
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets["mlflow_secret_key"]
    if "postgres_password" in secrets:
        env["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(
            environ["POSTGRES_USER"],
            secrets["postgres_password"],
            environ.get("POSTGRES_HOST", "postgres:5432"),
            environ["POSTGRES_DB"],
        )
    return env


def join_ray(env: Mapping[str, str]) -> None:
    address = env.get("RAY_ADDRESS")
    if not address:
        sys.exit("--join-ray needs RAY_ADDRESS, the cluster's head (host:port)")
    started = subprocess.run(
        ["ray", "start", f"--address={address}", "--num-cpus=0", "--num-gpus=0"],
        env=dict(env),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        sys.exit(f"could not join the Ray cluster at {address}:\n{started.stderr[-2000:]}")


def main(argv: list[str]) -> None:
    join = argv[:1] == ["--join-ray"]
    command = argv[1:] if join else argv
    if not command:
        sys.exit("usage: entrypoint.py [--join-ray] COMMAND [ARG...]")
    env = command_env(read_secrets(SECRETS), os.environ)
    if join:
        join_ray(env)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
