"""`python -m pipeline.quick` (`make quick`): the whole DAG at smoke size, in minutes on a CPU.

Copies the project (the files git tracks or would track, less the committed full-size run's
``dvc.lock`` and ``runs/`` records) into its own git + DVC repo,
``quick/`` by default, with ``params.yaml`` changed as ``pipeline/quick.yaml`` says (a tiny
model, a slice of PTB, two epochs a stage), then runs the pipeline there as ``make repro``
does (``python -m pipeline.repro``: ``dvc repro``, independent stages at once). The real
``params.yaml`` and the project's own outputs are left alone. Run again, it copies the files
anew and DVC reruns only what changed; ``--fresh`` starts over. The report lands in
``quick/report/``; ``mlflow ui --backend-store-uri sqlite:///quick/mlflow.db`` shows the runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_CHANGES = Path(__file__).with_name("quick.yaml")
GIT_IDENTITY = ["-c", "user.name=hitnet-quick", "-c", "user.email=quick@localhost"]


def deep_update(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` merged in, section by section."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


# The committed full-size experiment's records (its lock, metrics and histories): a copy is a
# new experiment of its own, which must not start from another's lock.
EXPERIMENT_RECORDS = ("dvc.lock", "runs/")


def project_files(root: Path) -> list[str]:
    """What git tracks in ``root``, and what it would (untracked, not ignored), less the
    experiment's records."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        name
        for name in listed.stdout.splitlines()
        if (root / name).is_file() and not name.startswith(EXPERIMENT_RECORDS)
    ]


def make_project(target: Path, changes: dict[str, Any], root: Path = REPO_ROOT) -> Path:
    """``root``'s files copied to ``target`` (a git repo, committed) with params changed.

    ``data.source``, when relative, is taken from ``root``: the copy reads the same PTB."""
    for name in project_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)
    params = deep_update(yaml.safe_load((root / "params.yaml").read_text()), changes)
    source = params["data"].get("source")
    if source is not None and not Path(source).is_absolute():
        params["data"]["source"] = str((root / source).resolve())
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (target / ".git").is_dir():
        subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run(["git", *GIT_IDENTITY, "add", "-A"], cwd=target, check=True)
    subprocess.run(  # nothing to commit on a rerun with no change: not an error
        ["git", *GIT_IDENTITY, "commit", "-qm", "quick look", "--allow-empty"],
        cwd=target,
        check=True,
    )
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / "quick", help="default: quick/")
    parser.add_argument("--fresh", action="store_true", help="delete --dir first")
    parser.add_argument("--jobs", type=int, default=3, help="stages at once (default: 3)")
    args = parser.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True, exist_ok=True)
    changes = yaml.safe_load(QUICK_CHANGES.read_text())
    project = make_project(args.dir.resolve(), changes)
    print(f"quick: the pipeline at smoke size in {project} (params: {QUICK_CHANGES.name})")
    env = dict(os.environ)  # the stages run `python -m pipeline...`: this Python first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    repro = [sys.executable, "-m", "pipeline.repro", "--jobs", str(args.jobs)]
    if subprocess.run(repro, cwd=project, env=env).returncode != 0:
        sys.exit(f"quick: the pipeline failed in {project}; rerunning resumes it")
    print(f"quick: done. The report: {project / 'report' / 'README.md'}")


if __name__ == "__main__":
    main()
