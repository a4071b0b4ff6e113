"""A Docker engine of the test's own: Debian's dockerd started by hand (no systemd), its
socket, state and Compose v2 plugin in the test's folders, and a base image made on this
machine (Docker Hub is not reachable from CI). Its containerd is its own too, started with
a config in the test's folder and given to dockerd by --containerd: without that flag,
dockerd 20.10 attaches to a system containerd whenever /run/containerd/containerd.sock
exists. Stopping it stops both daemons by their PIDs and removes the bridges and iptables
rules dockerd made, leaving the machine as it was.

The tools come from Debian's packages; .ci/engine-tools installs them:
docker.io (dockerd, containerd, runc and its own docker client), debootstrap, iptables, and
the Compose v2 plugin unpacked from Debian trixie's docker-compose package."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Where .ci/engine-tools unpacks the Compose v2 plugin (Debian bookworm has only v1).
COMPOSE_PLUGIN = Path(
    os.environ.get("HITNET_COMPOSE_PLUGIN", "/opt/compose-v2/docker/cli-plugins/docker-compose")
)
# Debian's client, which speaks the daemon's API version; the machine may have another one
# first on PATH.
DOCKER_CLIENT = Path("/usr/bin/docker")
# Image layers stay between runs (a cache, as any Docker host keeps); nothing else does.
DATA_ROOT = Path(os.environ.get("HITNET_ENGINE_DATA_ROOT", "/var/lib/hitnet-engine"))
IPTABLES_TABLES = ("filter", "nat")
DOCKER_LINK = re.compile(r"^(docker0|br-[0-9a-f]+|veth[0-9a-f]+)$")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The one system path the engine writes: runc shims put their sockets in /run/containerd/s,
# whatever containerd's config says. Removed at stop when it was not there before.
SYSTEM_CONTAINERD = Path("/run/containerd")


def missing_tools() -> list[str]:
    """What this machine lacks to run an engine; empty when it has everything."""
    missing = [
        name
        for name in ("dockerd", "containerd", "debootstrap", "iptables-save")
        if shutil.which(name) is None
    ]
    missing += [str(path) for path in (DOCKER_CLIENT, COMPOSE_PLUGIN) if not path.is_file()]
    if os.geteuid() != 0:
        missing.append("root (dockerd runs as root)")
    return missing


def containerd_config(folder: Path) -> str:
    """containerd's config for the engine in ``folder``: its socket and state there, its
    content beside the image layers (DATA_ROOT), no CRI plugin (as dockerd's own containerd
    has it) and nothing written to the system's paths (/run/containerd, /opt/containerd)."""
    run = folder / "containerd"
    return f"""version = 2
root = "{DATA_ROOT / "containerd" / "daemon"}"
state = "{run / "state"}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{run / "containerd.sock"}"

[debug]
  address = "{run / "containerd-debug.sock"}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{DATA_ROOT / "containerd" / "opt"}"
"""


def dockerd_command(folder: Path, containerd_socket: Path) -> list[str]:
    """dockerd for the engine in ``folder``, on the containerd at ``containerd_socket``."""
    return [
        "dockerd",
        "--storage-driver=overlay2",
        f"--data-root={DATA_ROOT}",
        f"--exec-root={folder / 'exec'}",
        f"--pidfile={folder / 'dockerd.pid'}",
        f"--host=unix://{folder / 'docker.sock'}",
        f"--containerd={containerd_socket}",
    ]


@dataclass(frozen=True)
class NetworkState:
    """What dockerd changes in the host's network: links, iptables chains, rules and
    policies (dockerd sets FORWARD's to DROP), IPv4 forwarding."""

    links: frozenset[str]
    chains: dict[str, frozenset[str]]  # the user-defined ones
    rules: dict[str, tuple[str, ...]]
    policies: dict[str, dict[str, str]]  # a built-in chain's, when not ACCEPT
    ip_forward: str

    @classmethod
    def now(cls) -> NetworkState:
        links = subprocess.run(
            ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        chains, rules, policies = {}, {}, {}
        for table in IPTABLES_TABLES:
            saved = subprocess.run(
                ["iptables-save", "-t", table], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            declared = [line[1:].split()[:2] for line in saved if line[:1] == ":"]
            chains[table] = frozenset(name for name, policy in declared if policy == "-")
            policies[table] = {
                name: policy for name, policy in declared if policy not in ("-", "ACCEPT")
            }
            rules[table] = tuple(line for line in saved if line.startswith("-A "))
        names = (line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
        return cls(
            links=frozenset(names),
            chains=chains,
            rules=rules,
            policies=policies,
            ip_forward=Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        )

    def undo_changes_since(self) -> None:
        """Removes the links, rules and chains that appeared after this state was taken."""
        now = NetworkState.now()
        for link in sorted(now.links - self.links):
            if DOCKER_LINK.match(link):
                subprocess.run(["ip", "link", "delete", link], capture_output=True)
        for table in IPTABLES_TABLES:
            new_chains = now.chains[table] - self.chains[table]
            old = set(self.rules[table])
            for rule in reversed(now.rules[table]):
                words = shlex.split(rule)
                if rule not in old and words[1] not in new_chains:
                    subprocess.run(["iptables", "-t", table, "-D", *words[1:]], check=True)
            for chain in new_chains:
                subprocess.run(["iptables", "-t", table, "-F", chain], check=True)
            for chain in new_chains:
                subprocess.run(["iptables", "-t", table, "-X", chain], check=True)
            for chain in now.policies[table].keys() | self.policies[table].keys():
                policy = self.policies[table].get(chain, "ACCEPT")
                subprocess.run(["iptables", "-t", table, "-P", chain, policy], check=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(self.ip_forward)


class Engine:
    """dockerd and its containerd with their sockets and run state in ``folder``; ``env`` is
    what a command needs to use it (this daemon, Debian's client first on PATH, the Compose
    v2 plugin)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        config = folder / "config"  # DOCKER_CONFIG: the client finds the plugin here
        (config / "cli-plugins").mkdir(parents=True)
        (config / "cli-plugins" / "docker-compose").symlink_to(COMPOSE_PLUGIN)
        client_bin = folder / "bin"
        client_bin.mkdir()
        (client_bin / "docker").symlink_to(DOCKER_CLIENT)
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(config),
            "PATH": f"{client_bin}{os.pathsep}{os.environ['PATH']}",
        }
        self.containerd_socket = folder / "containerd" / "containerd.sock"
        self.containerd: subprocess.Popen | None = None
        self.process: subprocess.Popen | None = None  # dockerd
        self.network_before = NetworkState.now()
        self.system_containerd_before = SYSTEM_CONTAINERD.exists()

    def start(self, timeout_s: float = 60) -> None:
        config = self.folder / "containerd.toml"
        config.write_text(containerd_config(self.folder))
        self.containerd = subprocess.Popen(
            ["containerd", f"--config={config}"],
            stdout=(self.folder / "containerd.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self.containerd_socket.is_socket():
            if self.containerd.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.folder / "containerd.log").read_text()[-3000:]
                raise AssertionError(f"containerd did not start: {log}")
            time.sleep(0.2)
        self.process = subprocess.Popen(
            dockerd_command(self.folder, self.containerd_socket),
            stdout=(self.folder / "dockerd.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"dockerd did not start: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return (self.folder / "dockerd.log").read_text()[-3000:]

    def docker(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, text=True, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM to dockerd, then to its containerd, SIGKILL to one that lingers; then
        whatever still runs from their run state, by PID; then the network changes are undone."""
        for process in (self.process, self.containerd):
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self.process = self.containerd = None
        for pid in self.leftover_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.network_before.undo_changes_since()
        if not self.system_containerd_before:  # the shims' empty socket folder, if any
            for folder in (SYSTEM_CONTAINERD / "s", SYSTEM_CONTAINERD):
                with contextlib.suppress(OSError):  # missing, or not empty: the test says
                    folder.rmdir()

    def leftover_processes(self) -> list[int]:
        """PIDs whose command line names this engine's run state (containerd, its shims)."""
        marker = str(self.folder).encode()
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if marker in (proc / "cmdline").read_bytes():
                        found.append(int(proc.name))
        return found

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for uri in re.findall(r"(?:URIs:|^deb)\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return DEFAULT_MIRROR


def import_debian_base(engine: Engine, tag: str, suite: str = "bookworm") -> None:
    """``tag``: Debian ``suite`` made by debootstrap (minbase) from apt's mirror, then
    `docker import`ed. Kept while the engine's data root is."""
    if engine.has_image(tag):
        return
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir="/var/tmp") as rootfs:
        made = subprocess.run(
            ["debootstrap", "--variant=minbase", suite, rootfs, apt_mirror()],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{made.stdout[-3000:]}{made.stderr}")
        for cached in Path(rootfs, "var/cache/apt/archives").glob("*.deb"):
            cached.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        engine.docker("import", "-", tag, stdin=tar.stdout)
        assert tar.wait() == 0


# Stand-ins for the Docker Hub images docker-compose.yml uses by default: {variable: (tag,
# Dockerfile in this folder)}. The stack's own Dockerfile builds on them unchanged.
STAND_INS = {
    "PYTHON_IMAGE": ("hitnet-ci/python:3.11", "python.Dockerfile"),
    "POSTGRES_IMAGE": ("hitnet-ci/postgres:15", "postgres.Dockerfile"),
}


def build_stand_ins(engine: Engine, base: str) -> dict[str, str]:
    """Builds the stand-ins from ``base`` (at once: they mostly wait on the network);
    returns the variables that point docker-compose.yml at them."""
    with tempfile.TemporaryDirectory() as context:
        for name in ("python.Dockerfile", "postgres.Dockerfile", "postgres-entrypoint.sh"):
            shutil.copy2(Path(__file__).with_name(name), context)
        # the machine's CA bundle: registries may be reached through a proxy with its own CA
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", Path(context) / "host-ca.crt")
        builds = {
            tag: subprocess.Popen(
                [
                    *("docker", "build", "-q", "-f", str(Path(context, dockerfile))),
                    *("--build-arg", f"BASE_IMAGE={base}", "-t", tag, context),
                ],
                env=engine.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for tag, dockerfile in STAND_INS.values()
        }
        for tag, build in builds.items():
            output = build.communicate()[0]
            assert build.returncode == 0, f"building {tag} failed:\n{output[-3000:]}"
    return {variable: tag for variable, (tag, _) in STAND_INS.items()}
