"""`python -m pipeline.repro` (`make repro`): `dvc repro`, with independent stages at once.

`dvc repro` runs one stage at a time, yet most of this DAG is independent: the two cells' FP
models, their sweeps, one ternary model per cell and training seed. Alone, none of these
small recurrent runs fills a GPU. This driver walks DVC's own graph of dvc.yaml and starts
each stage, as `dvc repro --single-item <stage>`, once every stage it depends on has
finished, up to ``--jobs`` at a time. Each is an ordinary DVC run: DVC releases its repository
lock while a stage's command runs and takes it back to record the result
(``--wait-for-lock`` queues those short commits), so dvc.lock, `dvc status` and the resume of
a killed stage behave as under a plain `dvc repro`, and an up-to-date stage is skipped.

Every line a stage prints is echoed with the stage's name and kept in ``runs/repro.log``,
with each stage's start and end; ``runs/timing.json`` maps each stage to its wall seconds, and
``"total"`` to the whole run's. A failed stage stops new starts; the running ones finish.

On a host with several GPUs each training stage gets one of them (``CUDA_VISIBLE_DEVICES``),
the one running the fewest stages, so independent stages train on different GPUs; a sweep
(``tune@...``) sees them all and spreads its trials over them itself (Ray). DVC has no notion
of devices, hence this hand-written share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# Many of these stages are short, or wait on process start-up and their GPU: more at once
# than cores pays (2 cores: 2 jobs; 16 or more: 8).
DEFAULT_JOBS = min(8, max(2, (os.cpu_count() or 2) // 2))


def stage_dependencies(root: Path = Path(".")) -> dict[str, list[str]]:
    """Each stage of dvc.yaml (in its order) and the stages whose outputs it reads."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge goes from a stage to one it depends on
        return {
            stage.addressing: sorted(upstream.addressing for upstream in graph.successors(stage))
            for stage in graph.nodes
        }


def with_upstream(dependencies: dict[str, list[str]], targets: list[str]) -> dict[str, list[str]]:
    """The part of the graph that ``targets`` need: they and every stage upstream of them, as
    `dvc repro <target>` would run. Raises ``ValueError`` naming a stage dvc.yaml lacks."""
    unknown = [target for target in targets if target not in dependencies]
    if unknown:
        raise ValueError(
            f"no stage {', '.join(unknown)} in dvc.yaml; its stages are: {', '.join(dependencies)}"
        )
    needed: set[str] = set()
    stack = list(targets)
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack.extend(dependencies[name])
    return {name: upstream for name, upstream in dependencies.items() if name in needed}


# stages that spread their own work over every GPU they see (Ray Tune's trials)
SPREADS_OVER_GPUS = ("tune@",)


def visible_gpus(env: dict[str, str]) -> list[str]:
    """The GPUs the stages may use, as CUDA_VISIBLE_DEVICES names them."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [gpu for gpu in env["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


@dataclass
class GpuShare:
    """Which GPU a starting stage gets: the one running the fewest stages."""

    gpus: list[str]
    given: dict[str, str] = field(default_factory=dict)  # running stage -> its GPU

    def take(self, stage: str) -> str | None:
        """The ``CUDA_VISIBLE_DEVICES`` for ``stage`` (None: leave the environment's)."""
        if len(self.gpus) < 2:
            return None
        if stage.startswith(SPREADS_OVER_GPUS):
            return ",".join(self.gpus)
        running = list(self.given.values())
        self.given[stage] = min(self.gpus, key=running.count)
        return self.given[stage]

    def give_back(self, stage: str) -> None:
        self.given.pop(stage, None)


@dataclass
class StageRun:
    process: subprocess.Popen
    started: float
    echo: threading.Thread


@dataclass
class Schedule:
    """Which stages may start: all their dependencies done, fewer than ``jobs`` running."""

    dependencies: dict[str, list[str]]
    jobs: int
    done: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)

    def ready(self) -> list[str]:
        if self.failed:
            return []
        waiting = [
            name
            for name, upstream in self.dependencies.items()
            if name not in self.done | self.running and set(upstream) <= self.done
        ]
        return waiting[: max(0, self.jobs - len(self.running))]

    def finished(self) -> bool:
        return not self.running and (bool(self.failed) or self.done == set(self.dependencies))


def _echo(stream: IO[str], name: str, write: Callable[[str], None]) -> None:
    for line in stream:
        write(f"[{name}] {line}")


def run(
    dependencies: dict[str, list[str]],
    jobs: int,
    command: Callable[[str], list[str]],
    write: Callable[[str], None],
    env: dict[str, str] | None = None,
    gpus: list[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Runs every stage by ``command(stage)`` in dependency order, up to ``jobs`` at once,
    sharing out ``gpus`` (``GpuShare``); returns each stage's start and end, in seconds from
    the first start. Raises ``RuntimeError`` naming a failed stage."""
    schedule = Schedule(dependencies, jobs)
    share = GpuShare(gpus or [])
    runs: dict[str, StageRun] = {}
    spans: dict[str, tuple[float, float]] = {}
    start = time.monotonic()
    while not schedule.finished():
        for name in schedule.ready():
            stage_env = dict(os.environ if env is None else env)
            gpu = share.take(name)
            if gpu is not None:
                stage_env["CUDA_VISIBLE_DEVICES"] = gpu
            write(f"repro: starting {name}" + ("" if gpu is None else f" on GPU {gpu}") + "\n")
            process = subprocess.Popen(
                command(name),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=stage_env,
            )
            echo = threading.Thread(target=_echo, args=(process.stdout, name, write))
            echo.start()
            runs[name] = StageRun(process, time.monotonic(), echo)
            schedule.running.add(name)
        for name in list(schedule.running):
            stage = runs[name]
            if stage.process.poll() is None:
                continue
            stage.echo.join()
            spans[name] = (stage.started - start, time.monotonic() - start)
            schedule.running.discard(name)
            share.give_back(name)
            seconds = spans[name][1] - spans[name][0]
            if stage.process.returncode == 0:
                schedule.done.add(name)
                write(f"repro: {name} done in {seconds:.0f} s (at {spans[name][1]:.0f} s)\n")
            else:
                schedule.failed.append(name)
                write(
                    f"repro: {name} failed (exit {stage.process.returncode}); no new stage starts\n"
                )
        time.sleep(0.2)
    if schedule.failed:
        raise RuntimeError(
            f"stage {', '.join(schedule.failed)} failed; its output is above (prefixed with "
            "its name). Rerunning resumes: finished stages are kept"
        )
    return spans


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "targets",
        nargs="*",
        metavar="STAGE",
        help="run these stages and those upstream of them (default: every stage)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        help=f"stages at once (default here: {DEFAULT_JOBS}: half the CPU cores, 2 to 8)",
    )
    parser.add_argument("--log", type=Path, default=Path("runs/repro.log"))
    parser.add_argument("--timing", type=Path, default=Path("runs/timing.json"))
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    dependencies = stage_dependencies()
    if args.targets:
        try:
            dependencies = with_upstream(dependencies, args.targets)
        except ValueError as error:
            parser.error(str(error))
    env = dict(os.environ)
    # Stages at once share the cores: torch's threads each, not all of them each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    args.log.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    with args.log.open("w", encoding="utf-8") as log:

        def write(line: str) -> None:
            with lock:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        started = time.monotonic()
        try:
            spans = run(
                dependencies,
                args.jobs,
                lambda name: ["dvc", "--wait-for-lock", "repro", "--single-item", name],
                write,
                env,
                visible_gpus(env),
            )
        except RuntimeError as error:
            sys.exit(f"repro: {error}")
    total = round(time.monotonic() - started, 1)
    args.timing.parent.mkdir(parents=True, exist_ok=True)
    timing = {name: round(end - begin, 1) for name, (begin, end) in spans.items()}
    args.timing.write_text(json.dumps({**timing, "total": total}, indent=2) + "\n")
    print(f"repro: every stage done in {total:.0f} s; timings in {args.timing}")


if __name__ == "__main__":
    main()
