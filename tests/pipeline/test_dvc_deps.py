"""dvc.yaml lists, for every stage, each module of this project that its command runs: an
edit to any of them reruns the stage, and no other edit does."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def _module_file(name: str) -> Path | None:
    """The project's file for a dotted module name; None for other packages."""
    path = REPO_ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_project_files(entry: str) -> set[str]:
    """Every project file that ``python -m entry`` imports, transitively (relative paths)."""
    seen: set[Path] = set()
    waiting = [_module_file(entry)]
    while waiting:
        path = waiting.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                waiting += [_module_file(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                waiting.append(_module_file(node.module))
    return {str(path.relative_to(REPO_ROOT)) for path in seen}


def _stage(name: str) -> dict:
    stage = STAGES[name]
    return stage.get("do", stage)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_runs_is_one_of_its_deps(name: str):
    stage = _stage(name)
    (entry,) = re.findall(r"python -m ([\w.]+)", stage["cmd"])
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in stage["deps"]]
    missing = [
        module
        for module in sorted(imported_project_files(entry))
        if not any(module == dep or module.startswith(f"{dep}/") for dep in deps)
        and not module.endswith("__init__.py")
    ]
    assert missing == [], f"{name}: add to its deps in dvc.yaml"
    modules = imported_project_files(entry)
    extra = [dep for dep in deps if dep.endswith(".py") and dep not in modules]
    assert extra == [], f"{name}: its command never runs these deps"


def test_the_import_walk_follows_the_projects_modules_only():
    files = imported_project_files("pipeline.report")
    assert {"pipeline/report.py", "pipeline/builders.py", "hitnet/data.py"} <= files
    assert not any(name.startswith(("torch", "mlflow")) for name in files)


def test_no_stage_module_imports_another_stage_module():
    """What stages share lives in modules of their own (builders, params, ...), so editing
    one stage's module reruns that stage alone."""
    entries = {re.findall(r"python -m ([\w.]+)", _stage(name)["cmd"])[0] for name in STAGES}
    assert {"pipeline.prepare", "pipeline.train", "pipeline.tune", "pipeline.report"} <= entries
    stage_files = {f"{entry.replace('.', '/')}.py" for entry in entries}
    for entry in sorted(entries):
        imported = imported_project_files(entry) & stage_files
        assert imported == {f"{entry.replace('.', '/')}.py"}, f"{entry} imports {imported}"
