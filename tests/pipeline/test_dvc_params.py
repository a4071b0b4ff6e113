"""dvc.yaml's params per stage: a stage of one cell lists every params.yaml key its code
reads (its ``used_params``) and no other cell's ``per_cell`` entry, so that editing one
cell's values reruns that cell's stages only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

from pipeline import study, train, tune
from pipeline.params import Params
from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import (
    SMOKE_SEEDS,
    commit_stand_in_outputs,
    make_smoke_project,
    run_tool,
    write_params,
)

# What each per-cell stage reads, by the stage's own account (hashed for resume, logged).
USED: dict[str, Callable[[Params, str], dict]] = {
    "train_fp": lambda params, cell: train.used_params(params, "fp", cell),
    # the seed is the matrix's (the stage's --seed), not params.yaml's
    "train_ternary": lambda params, cell: {
        key: value
        for key, value in train.used_params(params, "ternary", cell).items()
        if key != "seed"
    },
    "tune": tune.used_params,
    "study": study.used_params,
}


def leaves(tree: object, prefix: str = "") -> set[str]:
    """The dotted keys of a nested mapping's values (an empty mapping is a value)."""
    if isinstance(tree, dict) and tree:
        return set().union(*(leaves(value, f"{prefix}{key}.") for key, value in tree.items()))
    return {prefix.rstrip(".")}


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(f"{prefix}.")


def _listed(stage) -> list[str]:
    return [key for dep in stage.deps if isinstance(dep, ParamsDependency) for key in dep.params]


def _stages(root: Path) -> dict[str, object]:
    with Repo(str(root)) as repo:
        return {stage.addressing: stage for stage in repo.index.stages}


STAGES = _stages(REPO_ROOT)
PARAMS_YAML = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
PER_CELL = sorted(name for name in STAGES if name.split("@")[0] in USED)


def _corpus_keys(stage) -> set[str]:
    """Keys of the stages whose outputs this one reads as data (data/ptb): their effect
    reaches it through that output's content, a dep of its own."""
    deps = {str(dep.def_path) for dep in stage.deps}
    producers = [s for s in STAGES.values() if {str(o.def_path) for o in s.outs} & deps]
    return {
        key
        for producer in producers
        if producer.addressing == "prepare"
        for key in _listed(producer)
    }


def check_stage_params(name: str, stage, params_yaml: dict) -> None:
    kind, cell = name.split("@")[0], name.split("@")[1].split("-")[0]
    in_yaml = leaves(params_yaml)
    used = leaves(USED[kind](Params.model_validate(params_yaml), cell))
    read = {y for y in in_yaml if any(_under(u, y) or _under(y, u) for u in used)}
    listed = _listed(stage)
    covered = {y for y in in_yaml if any(_under(y, key) for key in listed)}
    missing = read - covered - _corpus_keys(stage)
    assert not missing, f"{name}: its code reads {sorted(missing)}; list them in dvc.yaml"
    unread = covered - read  # e.g. another cell's per_cell entries
    assert not unread, f"{name}: lists {sorted(unread)}, which its code never reads"


@pytest.mark.parametrize("name", PER_CELL)
def test_a_cells_stage_lists_the_keys_it_reads_and_no_other_cells(name: str):
    check_stage_params(name, STAGES[name], PARAMS_YAML)


def test_the_check_fails_for_a_whole_section_or_a_key_left_out():
    """The check itself: today's fault (a whole ``train_ternary``) and a key left out."""
    stage = STAGES["tune@lstm"]
    with pytest.raises(AssertionError, match=r"lists \['train_ternary.per_cell.gru.average"):
        check_stage_params(
            "tune@lstm", _listing(stage, [*_listed(stage), "train_ternary"]), PARAMS_YAML
        )
    fewer = [key for key in _listed(stage) if key != "quant.ttq_scaled"]
    with pytest.raises(AssertionError, match=r"reads \['quant.ttq_scaled'\]"):
        check_stage_params("tune@lstm", _listing(stage, fewer), PARAMS_YAML)


def _listing(stage, keys: list[str]) -> SimpleNamespace:
    """A stand-in of ``stage`` that lists ``keys`` of params.yaml (its other deps kept)."""
    deps = [dep for dep in stage.deps if not isinstance(dep, ParamsDependency)]
    params = ParamsDependency(stage, "params.yaml", keys)
    return SimpleNamespace(addressing=stage.addressing, outs=stage.outs, deps=[*deps, params])


def _changed_stages(project: Path) -> set[str]:
    return set(json.loads(run_tool(project, "dvc", "status", "--json").stdout))


@pytest.mark.slow
def test_dvc_reruns_only_the_edited_cells_stages(tmp_path: Path):
    """DVC itself, on a smoke project whose lock is recorded (``dvc commit`` of stand-in
    outputs: the params part of the lock is what a repro writes)."""
    project = commit_stand_in_outputs(make_smoke_project(tmp_path / "project"))
    assert _changed_stages(project) == set()

    ternary = {"gru": {"lr": 1.5}}
    write_params(project, {"train_ternary": {"per_cell": ternary}})
    gru_seeds = {f"train_ternary@gru-{seed}" for seed in SMOKE_SEEDS}
    assert _changed_stages(project) == {"tune@gru", "study@gru", *gru_seeds}
    run_tool(project, "dvc", "commit", "--force")

    write_params(project, {"quant": {"per_cell": {"lstm": {"lambda_sigma": 3.0}}}})
    lstm_seeds = {f"train_ternary@lstm-{seed}" for seed in SMOKE_SEEDS}
    assert _changed_stages(project) == {"tune@lstm", "study@lstm", *lstm_seeds}
    run_tool(project, "dvc", "commit", "--force")

    write_params(project, {"train_fp": {"per_cell": {"gru": {"epochs": 3}}}})
    assert _changed_stages(project) == {"train_fp@gru"}
