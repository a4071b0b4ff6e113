"""docker-compose.yml and docker-compose.gpu.yml, checked as files: images build from what
exists, variables and secrets are documented, secrets never sit in the environment or on a
command line, ports stay on loopback, GPUs are reserved for the training and the workers,
services are health-checked (the ray-worker: joined to the head), the image can compile for
Triton and its services' commands exist in it. tests/stack runs the stack for real under an
engine (and merges the GPU file with compose itself); this catches in seconds what needs
none."""

from __future__ import annotations

import posixpath
import re
import tomllib

import yaml

from tests.conftest import REPO_ROOT

COMPOSE_TEXT = (REPO_ROOT / "docker-compose.yml").read_text()
GPU_TEXT = (REPO_ROOT / "docker-compose.gpu.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
DOCKERFILE = (REPO_ROOT / "docker" / "Dockerfile").read_text()
ENV_EXAMPLE = (REPO_ROOT / ".env.example").read_text()
DOCUMENTED = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE, re.M))
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
# What each command needs in the project image: the requirement that provides it.
COMMAND_PACKAGES = {"mlflow": "mlflow", "ray": "ray[tune]", "dvc": "dvc"}
HITNET_IMAGE = "hitnet-pipeline:latest"
ENTRYPOINT = "/opt/hitnet/docker/entrypoint.py"
# Services up until `docker compose down`; the others (profiles) run on demand.
LONG_RUNNING = [name for name, service in SERVICES.items() if "profiles" not in service]


def _command_words(command: str | list[str]) -> list[str]:
    return command.split() if isinstance(command, str) else command


def test_the_project_image_is_built_by_one_service_from_an_existing_dockerfile():
    builders = [name for name, service in SERVICES.items() if "build" in service]
    assert len(builders) == 1  # one build, one export: the others run the same image
    build = SERVICES[builders[0]]["build"]
    assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file()
    for name, service in SERVICES.items():
        assert service["image"] == HITNET_IMAGE or service["image"].startswith("${"), name


def test_base_images_are_variables_with_docker_hubs_images_as_defaults():
    assert "ARG PYTHON_IMAGE=python:3.11-slim\nFROM ${PYTHON_IMAGE}" in DOCKERFILE
    args = next(s["build"]["args"] for s in SERVICES.values() if "build" in s)
    assert args["PYTHON_IMAGE"] == "${PYTHON_IMAGE:-python:3.11-slim}"
    assert SERVICES["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"
    assert DOCUMENTED["PYTHON_IMAGE"] == "python:3.11-slim"
    assert DOCUMENTED["POSTGRES_IMAGE"] == "postgres:16"


def test_every_variable_and_secret_is_documented_in_env_example():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_TEXT + GPU_TEXT))
    used |= {secret["environment"] for secret in COMPOSE["secrets"].values()}
    assert used, "no variables found: the pattern is wrong"
    assert used <= DOCUMENTED.keys(), used - DOCUMENTED.keys()


def test_secrets_are_files_never_environment_or_command_line():
    secret_variables = {secret["environment"] for secret in COMPOSE["secrets"].values()}
    assert {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "RAY_AUTH_TOKEN"} <= secret_variables
    for name in secret_variables:
        assert DOCUMENTED[name] == "change-me", name  # new_env.py fills each one
        assert f"${{{name}" not in COMPOSE_TEXT, name  # not interpolated anywhere
    for name, service in SERVICES.items():
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"], (name, secret)
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    for name in ("ray-head", "ray-worker", "pipeline"):
        assert SERVICES[name]["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"


def test_env_stays_out_of_git_and_of_the_image():
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO_ROOT / ".dockerignore").read_text().splitlines()


def test_published_ports_bind_to_loopback_and_ray_internals_stay_unpublished():
    published = [(name, port) for name, s in SERVICES.items() for port in s.get("ports", [])]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)
        container_port = str(port).rsplit(":", 1)[-1]
        # GCS, client, dashboard and jobs API, serve
        assert container_port not in {"6379", "10001", "8265", "8000"}, (name, port)
    assert "--include-dashboard=false" in SERVICES["ray-head"]["command"]


def test_mlflow_allowed_hosts_name_ports_as_the_host_header_does():
    # MLflow compares the Host header exactly, port included, unless the pattern has "*".
    for host in DOCUMENTED["MLFLOW_ALLOWED_HOSTS"].split(","):
        assert ":" in host, host
    assert "mlflow:5000" in DOCUMENTED["MLFLOW_ALLOWED_HOSTS"].split(",")  # the pipeline's


def test_mlflow_has_basic_auth_and_a_healthy_postgres():
    mlflow = SERVICES["mlflow"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    command = _command_words(mlflow["command"])
    assert "--app-name=basic-auth" in command and "--serve-artifacts" in command
    assert not any(word.startswith("--backend-store-uri") for word in command)  # the entrypoint's
    assert {"postgres_password", "mlflow_admin_password"} <= set(mlflow["secrets"])


def test_the_pipeline_runs_a_ray_node_and_sees_ptb_where_params_point():
    pipeline = SERVICES["pipeline"]
    assert pipeline["entrypoint"][-1] == "--join-ray"
    assert pipeline["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    source = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["data"]["source"]
    for name in ("pipeline", "ray-worker"):
        # SOURCE:TARGET[:ro], SOURCE maybe ${VAR:-default}
        targets = {
            volume.removesuffix(":ro").rsplit(":", 1)[1] for volume in SERVICES[name]["volumes"]
        }
        assert "/work" in targets, name
        assert posixpath.normpath(posixpath.join("/work", source)) in targets, name
    # a fresh clone's .env (from .env.example) mounts PTB from where params.yaml reads it
    assert f"${{PTB_DIR:-{DOCUMENTED['PTB_DIR']}}}:/shared/data/ptb:ro" in COMPOSE_TEXT
    assert DOCUMENTED["PTB_DIR"] == source


def test_the_gpu_file_gives_every_gpu_to_the_training_and_to_one_worker():
    gpu = yaml.safe_load(GPU_TEXT)["services"]
    for name in ("pipeline", "ray-worker"):
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}], name
    assert "deploy" not in COMPOSE_TEXT  # CI has no GPU: the base file reserves none
    assert not re.search(r"docker compose up .*--scale", (REPO_ROOT / "README.md").read_text())


def test_every_long_running_service_is_health_checked_so_up_wait_waits_for_it():
    assert LONG_RUNNING == ["postgres", "mlflow", "ray-head", "ray-worker"]
    for name in LONG_RUNNING:
        assert SERVICES[name]["healthcheck"]["test"], name


def test_the_ray_worker_is_healthy_once_the_head_lists_its_node_as_alive():
    test = SERVICES["ray-worker"]["healthcheck"]["test"]
    assert test == ["CMD", "python", "/opt/hitnet/docker/ray_node_alive.py", "ray-head:6379"]
    assert SERVICES["ray-worker"]["environment"]["RAY_AUTH_MODE"] == "token"  # as its node's
    assert re.search(r"^COPY docker/entrypoint.py docker/ray_node_alive.py ", DOCKERFILE, re.M)
    script = (REPO_ROOT / "docker" / "ray_node_alive.py").read_text()
    assert "find_node_ids()" in script and "GcsNodeState.ALIVE" in script


def test_the_image_has_a_c_compiler_for_triton():
    # hardware.compile: auto is torch.compile on CUDA: Triton compiles with cc when it starts
    (packages,) = re.findall(r"apt-get install -y --no-install-recommends ([^\\\n]+)", DOCKERFILE)
    assert {"gcc", "libc6-dev"} <= set(packages.split())


def test_readme_names_the_services_that_refuse_placeholder_secrets():
    """docker/entrypoint.py refuses an empty or `change-me` secret; postgres (Docker Hub's
    image) does not run it, and README says so."""
    assert f'ENTRYPOINT ["python", "{ENTRYPOINT}"]' in DOCKERFILE
    with_secrets = [name for name, service in SERVICES.items() if service.get("secrets")]
    checked = [
        name
        for name in with_secrets
        if SERVICES[name]["image"] == HITNET_IMAGE
        and SERVICES[name].get("entrypoint", ["python", ENTRYPOINT])[:2] == ["python", ENTRYPOINT]
    ]
    assert [name for name in with_secrets if name not in checked] == ["postgres"]
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert (
        f"a service of the project image ({', '.join(checked)}) whose secret is empty or "
        "`change-me` refuses to start" in readme
    )
    assert "postgres takes its password as it is" in readme


def test_torch_and_the_dependencies_are_installed_before_the_code_is_copied():
    torch = DOCKERFILE.index("torch==2.13.0")
    dependencies = DOCKERFILE.index("pip install --no-cache-dir -r /tmp/requirements.txt")
    code = DOCKERFILE.index("COPY hitnet")
    assert torch < dependencies < code
    assert "COPY pyproject.toml ./" in DOCKERFILE[torch:dependencies]
    assert DOCKERFILE.count("COPY ") - DOCKERFILE[code:].count("COPY ") == 2  # wheels, pyproject


def test_service_commands_exist_in_the_image():
    installed = {
        re.split(r"[=<>]", dep)[0]
        for dep in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["server"]
    }
    assert {"mlflow[auth]", "psycopg2-binary"} <= installed  # basic auth, PostgreSQL driver
    for name, service in SERVICES.items():
        if service["image"] != HITNET_IMAGE:
            continue
        program = _command_words(service["command"])[0]
        assert COMMAND_PACKAGES[program] in installed, (name, program)
        if "curl" in service.get("healthcheck", {}).get("test", []):
            assert "curl" in DOCKERFILE, name
