"""pipeline/params.py: params.yaml is typed once; a bad value names its dotted key."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from hitnet.constraints import violation
from hitnet.language_model import ModelConfig
from hitnet.lightning_module import LanguageModelTask
from hitnet.quantizers import HITNET_QUANT, QuantConfig
from pipeline.params import (
    MODEL_FIELDS_IN_QUANT,
    QUANT_SEARCHED,
    RECIPE_PER_CELL,
    SEARCHED,
    HardwareParams,
    ModelParams,
    Params,
    ParamsError,
    QuantOverride,
    QuantParams,
    RecipeOverride,
    SearchedSetting,
    TrainParams,
    TuneOverride,
    TuneParams,
    load_params,
    load_searched,
    parse_params,
)
from pipeline.quick import QUICK_CHANGES
from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import deep_update

REPO_PARAMS = REPO_ROOT / "params.yaml"


@pytest.fixture(scope="module")
def repo_raw() -> dict[str, Any]:
    """The repository's params.yaml, parsed but not validated."""
    return yaml.safe_load(REPO_PARAMS.read_text(encoding="utf-8"))


def test_repo_params_give_the_classic_recipe() -> None:
    params = load_params(REPO_PARAMS)
    assert params.cells == ["lstm", "gru"]
    assert params.model.embedding_size == 300
    assert params.model.hidden_size == 300
    assert params.model.num_layers == 1
    assert params.model.dropout == 0.5
    assert params.data.batch_size == 20
    assert params.data.bptt == 35
    for train in (params.train_fp, params.train_ternary):
        assert train.clip == 0.25
        assert train.lr_decay == 0.25
    assert params.train_fp.lr == 20.0 and params.train_fp.epochs == 40
    # every cell has an entry (dvc.yaml tracks each), and none changes the FP recipe
    assert set(params.train_fp.per_cell) == {"lstm", "gru"}
    assert (
        params.recipe("fp", "gru")
        == params.recipe("fp", "lstm")
        == params.train_fp.model_copy(update={"per_cell": {}})
    )
    # The ternary recipe of the GPU results (results/h100/search*.md), one per cell.
    lstm, gru = params.recipe("ternary", "lstm"), params.recipe("ternary", "gru")
    assert (lstm.lr, lstm.dropout, lstm.lr_patience, lstm.epochs) == (10.0, 0.25, 2, 66)
    assert (gru.lr, gru.dropout, gru.lr_patience, gru.epochs) == (2.0, 0.2, 4, 110)
    assert (lstm.average_from_epoch, gru.average_from_epoch) == (None, 90)
    # the LSTM's lr cuts are fixed (search12.md); the GRU's plateau rule never cut
    assert (lstm.lr_milestones, gru.lr_milestones) == ([35, 47, 58], None)
    assert (lstm.activation_warmup_steps, gru.activation_warmup_steps) == (0, 0)
    assert (lstm.distill_weight, lstm.distill_temperature) == (0.9, 1.0)
    assert (gru.distill_weight, gru.distill_temperature) == (0.9, 2.0)
    # Sloping factors polarize the forward pass only (search4.md, search5.md).
    assert params.quant.slope_gradient == "unit"
    assert params.quant.weight == "ttq"
    assert params.quant.activation == "btq"
    # Validation rounds BTQ (search9.md); the report tests both ways, over training seeds.
    assert params.quant.btq_eval == "deterministic"
    assert len(params.training_seeds) >= 3 and len(params.report.eval_seeds) >= 3


def test_repo_params_parse_from_the_raw_dict(repo_raw: dict[str, Any]) -> None:
    assert parse_params(repo_raw) == load_params(REPO_PARAMS)


# id: (changes to the repository's params.yaml, the key the message names, what it expects)
BAD_VALUES = {
    "wrong-type": ({"model": {"hidden_size": "big"}}, "model.hidden_size", "valid integer"),
    "unknown-top-level": ({"sed": 0}, "sed", "Extra inputs are not permitted"),
    "unknown-in-section": (
        {"model": {"hiden_size": 300}},
        "model.hiden_size",
        "Extra inputs are not permitted",
    ),
    "negative-slope": ({"quant": {"lambda_sigma": -1}}, "quant.lambda_sigma", "greater than 0"),
    "threshold-too-high": (
        {"quant": {"ttq_threshold": 5}},
        "quant.ttq_threshold",
        "less than or equal to 3",
    ),
    "threshold-negative": (
        {"quant": {"ttq_threshold": -0.1}},
        "quant.ttq_threshold",
        "greater than or equal to 0",
    ),
    "unknown-cell": ({"cells": ["lstm", "rnn"]}, "cells", "'lstm' or 'gru'"),
    "unknown-weight-quantizer": (
        {"quant": {"weight": "fp4"}},
        "quant.weight",
        "'none', 'ttq', 'btq' or 'uq'",
    ),
    "zero-batch": ({"data": {"batch_size": 0}}, "data.batch_size", "greater than or equal to 1"),
    "lr-decay-above-one": ({"train_fp": {"lr_decay": 1.5}}, "train_fp.lr_decay", "less than 1"),
    "lr-threshold-not-a-fraction": (
        {"train_ternary": {"per_cell": {"lstm": {"lr_threshold": 1.0}}}},
        "train_ternary.per_cell.lstm.lr_threshold",
        "less than 1",
    ),
    "unknown-btq-eval": (
        {"quant": {"btq_eval": "rounded"}},
        "quant.btq_eval",
        "'stochastic' or 'deterministic'",
    ),
    "no-eval-seeds": ({"report": {"eval_seeds": []}}, "report.eval_seeds", "at least 1 item"),
    "unknown-precision": (
        {"hardware": {"precision": "8-bit"}},
        "hardware.precision",
        "'32-true', '16-mixed' or 'bf16-mixed'",
    ),
    "deterministic-not-a-boolean": (
        {"hardware": {"deterministic": "yes"}},
        "hardware.deterministic",
        "valid boolean",
    ),
    "tie-unequal-sizes": (
        {"model": {"tie_weights": True, "embedding_size": 200}},
        "model.tie_weights",
        "model.embedding_size == model.hidden_size",
    ),
    "distill-weight-above-one": (
        {"train_ternary": {"distill_weight": 1.5}},
        "train_ternary.distill_weight",
        "less than or equal to 1",
    ),
    "fp-stage-distils": (
        {"train_fp": {"distill_weight": 0.5}},
        "train_fp.distill_weight",
        "the FP model is the teacher",
    ),
    "fp-stage-distils-one-cell": (
        {"train_fp": {"per_cell": {"gru": {"distill_weight": 0.5}}}},
        "train_fp.per_cell.gru.distill_weight",
        "the FP model is the teacher",
    ),
    "fp-stage-warms-up-activations": (
        {"train_fp": {"per_cell": {"lstm": {"activation_warmup_steps": 500}}}},
        "train_fp.per_cell.lstm.activation_warmup_steps",
        "the FP model quantizes no activations",
    ),
    "negative-warmup": (
        {"train_ternary": {"activation_warmup_steps": -1}},
        "train_ternary.activation_warmup_steps",
        "greater than or equal to 0",
    ),
    "averaging-after-the-last-epoch": (
        {"train_ternary": {"epochs": 30, "average_from_epoch": 31}},
        "train_ternary.average_from_epoch",
        "after the lstm's last epoch (30)",
    ),
    "averaging-after-one-cells-last-epoch": (
        {"train_fp": {"average_from_epoch": 20, "per_cell": {"gru": {"epochs": 10}}}},
        "train_fp.average_from_epoch",
        "after the gru's last epoch (10)",
    ),
    "one-cells-averaging-after-its-last-epoch": (
        {"train_ternary": {"per_cell": {"gru": {"average_from_epoch": 115}}}},
        "train_ternary.per_cell.gru.average_from_epoch",
        "after the gru's last epoch (110)",
    ),
    "milestone-at-the-last-epoch": (
        {"train_ternary": {"lr_milestones": [10, 110]}},
        "train_ternary.lr_milestones",
        "before the gru's last (110)",
    ),
    "one-cells-milestones-out-of-order": (
        {"train_ternary": {"per_cell": {"gru": {"lr_milestones": [20, 10]}}}},
        "train_ternary.per_cell.gru.lr_milestones",
        "must be increasing",
    ),
    "searched-threshold-out-of-range": (
        {"tune": {"ttq_threshold": [0.5, 4.0]}},
        "tune.ttq_threshold.1",
        "less than or equal to 3",  # quant.ttq_threshold's range
    ),
    "searched-dropout-out-of-range": (
        {"tune": {"dropout": [0.1, 1.0]}},
        "tune.dropout.1",
        "less than 1",  # model.dropout's range
    ),
    "no-training-seed": ({"training_seeds": []}, "training_seeds", "at least 1"),
    "infinite-lr": ({"train_fp": {"lr": float("inf")}}, "train_fp.lr", "finite number"),
    "nan-slope": (
        {"quant": {"per_cell": {"lstm": {"lambda_sigma": float("nan")}}}},
        "quant.per_cell.lstm.lambda_sigma",
        "finite number",
    ),
    "repeated-training-seed": ({"training_seeds": [0, 1, 0]}, "training_seeds", "distinct"),
    "no-lambda": ({"study": {"lambdas": []}}, "study.lambdas", "at least 1"),
    "zero-lambda": ({"study": {"lambdas": [1.0, 0.0]}}, "study.lambdas.1", "greater than 0"),
    "lambda-twice": ({"study": {"lambdas": [1.0, 2.0, 1.0]}}, "study.lambdas", "distinct"),
    "polarized-band-overlaps": (
        {"study": {"polarized_within": 0.7}},
        "study.polarized_within",
        "less than or equal to 0.5",
    ),
    "no-study-epochs": ({"study": {"epochs": 0}}, "study.epochs", "greater than or equal to 1"),
    "one-bin": (
        {"study": {"histogram_bins": 1}},
        "study.histogram_bins",
        "greater than or equal to 2",
    ),
}


@pytest.mark.parametrize(("changes", "key", "expected"), BAD_VALUES.values(), ids=BAD_VALUES)
def test_bad_value_names_key_and_expectation(
    repo_raw: dict[str, Any], changes: dict[str, Any], key: str, expected: str
) -> None:
    with pytest.raises(ParamsError) as caught:
        parse_params(deep_update(repo_raw, changes))
    message = str(caught.value)
    assert "params.yaml is invalid" in message
    assert key in message
    assert expected in message


def test_bad_value_message_names_the_source(repo_raw: dict[str, Any]) -> None:
    raw = deep_update(repo_raw, {"data": {"bptt": 0}})
    with pytest.raises(ParamsError, match=r"^custom\.yaml is invalid"):
        parse_params(raw, "custom.yaml")


def test_missing_params_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ParamsError, match="file not found") as caught:
        load_params(path)
    assert str(path) in str(caught.value)


def test_invalid_yaml_is_a_params_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("model: {hidden_size: 300\ndata: [\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="is not valid YAML") as caught:
        load_params(path)
    assert str(path) in str(caught.value)


def test_load_params_reports_bad_value_with_the_path(
    tmp_path: Path, repo_raw: dict[str, Any]
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(deep_update(repo_raw, {"seed": -1})), encoding="utf-8")
    with pytest.raises(ParamsError, match="seed") as caught:
        load_params(path)
    assert f"{path} is invalid" in str(caught.value)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_full_precision_model_config(cell: str) -> None:
    params = load_params(REPO_PARAMS)
    config = params.build_model_config(cell, vocab_size=10_000, ternary=False)
    assert config.vocab_size == 10_000
    assert config.cell == cell
    assert config.embedding_size == 300
    assert config.hidden_size == 300
    assert config.num_layers == 1
    assert config.dropout == 0.5
    assert config.tie_weights is False
    assert config.quant == QuantConfig()
    assert config.quant.weight == "none"
    assert config.quant.activation == "none"
    assert config.lambda_sigma == 1.0
    assert config.lambda_tanh == 1.0
    assert config.ternary_embedding_decoder is False


def test_full_precision_ignores_quant_section(repo_raw: dict[str, Any]) -> None:
    raw = deep_update(
        repo_raw,
        {"quant": {"lambda_sigma": 2.5, "lambda_tanh": 3.0, "ternary_embedding_decoder": True}},
    )
    config = parse_params(raw).build_model_config("lstm", vocab_size=50, ternary=False)
    assert config.quant == QuantConfig()
    assert config.lambda_sigma == 1.0
    assert config.lambda_tanh == 1.0
    assert config.ternary_embedding_decoder is False


def test_ternary_model_config_takes_the_quant_section(repo_raw: dict[str, Any]) -> None:
    quant = {
        "weight": "uq",
        "activation": "ttq",
        "activations": ["gates", "hidden"],
        "ttq_threshold": 0.5,
        "ttq_scaled": False,
        "ttq_per_row": True,
        "uq_bits": 3,
        "btq_eval": "deterministic",
        "lambda_sigma": 2.5,
        "lambda_tanh": 3.0,
        "ternary_embedding_decoder": True,
        "gru_accumulator": True,
        "slope_gradient": "unit",
    }
    params = parse_params(deep_update(repo_raw, {"quant": quant}))
    config = params.build_model_config("gru", vocab_size=50, ternary=True)
    assert config.cell == "gru"
    assert config.quant == QuantConfig(
        weight="uq",
        activation="ttq",
        activations=frozenset({"gates", "hidden"}),
        ttq_threshold=0.5,
        ttq_scaled=False,
        ttq_per_row=True,
        uq_bits=3,
        btq_eval="deterministic",
        gru_accumulator=True,
        slope_gradient="unit",
    )
    assert config.lambda_sigma == 2.5
    assert config.lambda_tanh == 3.0
    assert config.ternary_embedding_decoder is True


def test_each_recipe_may_override_the_model_dropout() -> None:
    params = parse_params({"train_ternary": {"dropout": 0.2}})
    assert params.build_model_config("lstm", vocab_size=50, ternary=True).dropout == 0.2
    assert params.build_model_config("lstm", vocab_size=50, ternary=False).dropout == 0.5
    params = parse_params({"train_fp": {"dropout": 0.0}})
    assert params.build_model_config("gru", vocab_size=50, ternary=False).dropout == 0.0
    assert params.build_model_config("gru", vocab_size=50, ternary=True).dropout == 0.5


def test_per_cell_values_replace_the_shared_recipe_for_that_cell_only(
    repo_raw: dict[str, Any],
) -> None:
    per_cell = {
        "gru": {
            "lr": 2.0,
            "dropout": 0.1,
            "epochs": 7,
            "average_from_epoch": 5,
            "activation_warmup_steps": 300,
        }
    }
    raw = deep_update(repo_raw, {})
    raw["train_ternary"]["per_cell"] = per_cell  # the GRU's entry alone
    params = parse_params(raw)
    gru, lstm = params.recipe("ternary", "gru"), params.recipe("ternary", "lstm")
    assert (gru.lr, gru.dropout, gru.epochs, gru.average_from_epoch) == (2.0, 0.1, 7, 5)
    assert gru.activation_warmup_steps == 300
    assert gru.clip == params.train_ternary.clip and gru.per_cell == {}
    assert lstm == params.train_ternary.model_copy(update={"per_cell": {}})
    assert params.recipe("fp", "gru") == params.train_fp.model_copy(update={"per_cell": {}})
    assert params.build_model_config("gru", vocab_size=50, ternary=True).dropout == 0.1
    # A sweep's lr wins over the cell's own.
    assert params.with_searched({"lr": 4.0}).recipe("ternary", "gru").lr == 4.0


@pytest.mark.parametrize(
    ("per_cell", "key"),
    [
        ({"rnn": {"lr": 1.0}}, "train_ternary.per_cell.rnn"),
        ({"gru": {"momentum": 0.9}}, "train_ternary.per_cell.gru.momentum"),
        ({"gru": {"lr": -1.0}}, "train_ternary.per_cell.gru.lr"),
        ({"rnn": {"lambda_sigma": 2.0}}, "quant.per_cell.rnn"),
        ({"lstm": {"weight": "none"}}, "quant.per_cell.lstm.weight"),  # not a per-cell key
        ({"lstm": {"lambda_sigma": 0.0}}, "quant.per_cell.lstm.lambda_sigma"),
        ({"gru": {"ttq_threshold": 4.0}}, "quant.per_cell.gru.ttq_threshold"),
    ],
)
def test_bad_per_cell_values_name_their_key(
    repo_raw: dict[str, Any], per_cell: dict, key: str
) -> None:
    section = key.split(".")[0]
    with pytest.raises(ParamsError) as error:
        parse_params(deep_update(repo_raw, {section: {"per_cell": per_cell}}))
    assert key in str(error.value)


def test_ternary_model_config_from_repo_params() -> None:
    params = load_params(REPO_PARAMS)
    config = params.build_model_config("lstm", vocab_size=10_000, ternary=True)
    assert config.quant == params.quant.for_cell("lstm").to_config()
    assert config.quant.weight == "ttq"
    assert config.quant.activation == "btq"
    assert config.quant.activations == frozenset({"gates", "candidate", "hidden"})
    assert config.quant != QuantConfig()
    # The LSTM's slopes and threshold of the GPU search (search5.md); the GRU keeps the shared
    # slopes 1 with its own threshold (search10.md).
    assert (config.lambda_sigma, config.lambda_tanh, config.quant.ttq_threshold) == (2, 2, 0.5)
    gru = params.build_model_config("gru", vocab_size=10_000, ternary=True)
    assert (gru.lambda_sigma, gru.lambda_tanh, gru.quant.ttq_threshold) == (1, 1, 0.5)


def test_per_cell_quant_values_apply_to_that_cell_and_a_sweeps_best_wins_over_them(
    repo_raw: dict[str, Any],
) -> None:
    quant = {"lambda_sigma": 1.5, "per_cell": {"gru": {"lambda_tanh": 3.0, "ttq_threshold": 1.0}}}
    raw = deep_update(repo_raw, {"quant": quant})
    raw["quant"]["per_cell"].pop("lstm")
    params = parse_params(raw)
    gru = params.build_model_config("gru", vocab_size=50, ternary=True)
    assert (gru.lambda_sigma, gru.lambda_tanh, gru.quant.ttq_threshold) == (1.5, 3.0, 1.0)
    lstm = params.build_model_config("lstm", vocab_size=50, ternary=True)
    assert (lstm.lambda_sigma, lstm.lambda_tanh, lstm.quant.ttq_threshold) == (1.5, 1.0, 0.7)
    assert params.build_model_config("gru", vocab_size=50, ternary=False).lambda_tanh == 1.0
    best = params.with_searched({"lambda_tanh": 2.5, "ttq_threshold": 0.4})
    gru = best.build_model_config("gru", vocab_size=50, ternary=True)
    assert (gru.lambda_sigma, gru.lambda_tanh, gru.quant.ttq_threshold) == (1.5, 2.5, 0.4)


@pytest.mark.parametrize(
    ("accelerator", "compile_setting", "expected"),
    [
        ("cpu", "auto", None),  # eager off the GPU: compiling would cost more than it saves
        ("cpu", "default", "default"),
        ("auto", "none", None),
        ("cpu", "reduce-overhead", "reduce-overhead"),
    ],
)
def test_hardware_compile_mode(accelerator, compile_setting, expected):
    hardware = HardwareParams(accelerator=accelerator, compile=compile_setting)
    assert hardware.compile_mode() == expected


def test_hardware_gives_every_stages_trainer_the_same_arguments():
    off = HardwareParams(accelerator="cpu").trainer_kwargs()
    assert off == {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "deterministic": None,
    }
    assert HardwareParams(deterministic=True).trainer_kwargs()["deterministic"] == "warn"


def test_the_quick_look_changes_give_valid_params(repo_raw: dict[str, Any]) -> None:
    changes = yaml.safe_load(QUICK_CHANGES.read_text(encoding="utf-8"))
    params = parse_params(deep_update(repo_raw, changes), "pipeline/quick.yaml")
    assert params.hardware.accelerator == "cpu" and params.data.max_tokens is not None
    for cell in params.cells:  # every stage of the DAG at smoke size
        assert params.recipe("fp", cell).epochs <= 2 and params.recipe("ternary", cell).epochs <= 2
    assert params.training_seeds == load_params(REPO_PARAMS).training_seeds
    assert params.study.epochs == 1 and params.study.limit_train_batches is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty or not a mapping"),
        ("# only a comment\n", "is empty or not a mapping"),
        ("- seed\n", "is empty or not a mapping"),
        ("seed: 0\nseed: 1\n", "key 'seed' appears twice"),
        ("data:\n  bptt: 35\n  bptt: 70\n", "key 'bptt' appears twice"),
    ],
    ids=["empty", "comment-only", "a-list", "top-level-key-twice", "nested-key-twice"],
)
def test_an_empty_file_or_a_key_given_twice_is_an_error(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=expected) as caught:
        load_params(path)
    assert str(path) in str(caught.value)


BEST = {
    "lambda_sigma": 2.0,
    "lambda_tanh": 1.5,
    "ttq_threshold": 0.5,
    "val_ppl": 120.0,
    "winner": "sweep",
    "configured_val_ppl": 121.0,
}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"lambda_sigma": "2"}, "lambda_sigma"),
        ({"ttq_threshold": 5.0}, "ttq_threshold"),
        ({"dropout": 1.5}, "dropout"),
        ({"slopes": 2.0}, "slopes"),
        ({"winner": "me"}, "winner"),
    ],
    ids=["string-number", "theta-out-of-range", "dropout-out-of-range", "unknown-key", "winner"],
)
def test_a_sweeps_best_json_is_checked_as_params_yaml_is(
    tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "best.json"
    path.write_text(json.dumps(BEST))
    assert load_searched(path) == {"lambda_sigma": 2.0, "lambda_tanh": 1.5, "ttq_threshold": 0.5}
    path.write_text(json.dumps({**BEST, **changes}))
    with pytest.raises(ParamsError, match=rf"best.json is invalid:\n  {expected}"):
        load_searched(path)


def _declared(declaration) -> dict[str, tuple[object, object]]:
    """The library's declaration of each field: its annotation (with its range) and default."""
    hints = get_type_hints(declaration, include_extras=True)
    return {
        name: (hints[name], parameter.default)
        for name, parameter in inspect.signature(declaration).parameters.items()
        if name != "self"
    }


def _as_declared(section: type[BaseModel], name: str) -> object:
    """A section field's annotation, range included, as the library would declare it."""
    annotation = section.model_fields[name].rebuild_annotation()
    if get_origin(annotation) is list and section is QuantParams:  # a set in the library
        return frozenset[get_args(annotation)[0]]
    return annotation


LIBRARY_FIELDS = [
    pytest.param(QuantParams, QuantConfig, sorted(f.name for f in dataclasses.fields(QuantConfig))),
    pytest.param(QuantParams, ModelConfig, MODEL_FIELDS_IN_QUANT),
    pytest.param(ModelParams, ModelConfig, sorted(ModelParams.model_fields)),
    pytest.param(
        TrainParams,
        LanguageModelTask.__init__,
        sorted(set(inspect.signature(LanguageModelTask).parameters) - {"model", "eval_seed"}),
    ),
]


@pytest.mark.parametrize(("section", "declaration", "names"), LIBRARY_FIELDS)
def test_a_library_field_is_a_section_field_with_its_type_and_range(section, declaration, names):
    declared = _declared(declaration)
    for name in names:
        assert _as_declared(section, name) == declared[name][0], name


def test_params_yaml_defaults_are_the_librarys():
    """One default per field: the library's (HitNet's quantization for quant)."""
    for section, declaration, defaults in [
        (QuantParams, QuantConfig, HITNET_QUANT),
        (QuantParams, ModelConfig, None),
        (ModelParams, ModelConfig, None),
        (TrainParams, LanguageModelTask.__init__, None),
    ]:
        for name, (_, default) in _declared(declaration).items():
            if name in section.model_fields:
                expected = default if defaults is None else getattr(defaults, name)
                got = section.model_fields[name].default
                assert (got if name != "activations" else frozenset(got)) == expected, name
    # HitNet's quantization, as params.yaml leaves it when it names no quant value
    assert parse_params({"seed": 0}).quant.to_config() == HITNET_QUANT


def test_every_library_config_field_is_set_from_params_yaml():
    """The library's configs are filled by name: a field params.yaml lacks would silently
    keep the library's default."""
    in_yaml = set(QuantParams.model_fields) | set(ModelParams.model_fields)
    assert {f.name for f in dataclasses.fields(QuantConfig)} <= set(QuantParams.model_fields)
    assert {f.name for f in dataclasses.fields(ModelConfig)} - in_yaml == {
        "vocab_size",  # the data's
        "cell",  # the stage's
        "quant",  # QuantParams.to_config()
    }
    task_arguments = set(inspect.signature(LanguageModelTask).parameters) - {"model", "eval_seed"}
    assert task_arguments <= set(TrainParams.model_fields)


@pytest.mark.parametrize(
    ("section", "override", "names"),
    [
        (QuantParams, QuantOverride, QUANT_SEARCHED),
        (TrainParams, RecipeOverride, RECIPE_PER_CELL),
        (TuneParams, TuneOverride, SEARCHED),
    ],
)
def test_an_override_takes_exactly_its_fields_of_the_section_each_optional(
    section, override, names
):
    assert list(override.model_fields) == list(names)
    for name in names:
        assert override.model_fields[name].rebuild_annotation() == (
            section.model_fields[name].rebuild_annotation() | None
        )
        assert override.model_fields[name].default is None
    assert override().model_dump() == dict.fromkeys(names)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        override.model_validate({"clip": 1.0, "weight": "none"})


@given(value=st.floats(min_value=-10, max_value=10) | st.sampled_from([math.nan, math.inf]))
@pytest.mark.parametrize(
    ("section", "override", "name"),
    [
        (QuantParams, QuantOverride, "ttq_threshold"),
        (QuantParams, QuantOverride, "lambda_sigma"),
        (TrainParams, RecipeOverride, "lr_threshold"),
        (TrainParams, RecipeOverride, "distill_weight"),
        (TrainParams, RecipeOverride, "dropout"),
    ],
)
def test_a_value_the_section_refuses_its_override_refuses_and_so_does_the_library(
    section, override, name, value
):
    def accepts(model: type[BaseModel]) -> bool:
        try:
            model.model_validate({name: value})
        except ValidationError:
            return False
        return True

    library = dict(
        _declared(QuantConfig), **_declared(ModelConfig), **_declared(LanguageModelTask.__init__)
    )
    assert accepts(section) == accepts(override)
    if math.isfinite(value):  # params.yaml refuses inf and nan everywhere; the library, by range
        assert accepts(section) == (violation(name, value, library[name][0]) is None)


def test_the_params_schema_names_every_section_and_its_ranges():
    """Params' JSON schema (what an editor or a best.json check can validate against)."""
    schema = Params.model_json_schema()
    json.dumps(schema)  # plain JSON
    assert set(schema["properties"]) == set(Params.model_fields)
    quant = schema["$defs"]["QuantParams"]["properties"]
    assert quant["ttq_threshold"]["minimum"] == 0 and quant["ttq_threshold"]["maximum"] == 3
    assert quant["activations"]["items"]["enum"] == ["gates", "candidate", "hidden"]
    recipe = schema["$defs"]["TrainParams"]["properties"]
    assert recipe["lr"]["exclusiveMinimum"] == 0
    assert set(schema["$defs"]["RecipeOverride"]["properties"]) == set(RECIPE_PER_CELL)
    searched = SearchedSetting.model_json_schema()["properties"]
    assert searched["ttq_threshold"]["maximum"] == 3
    assert set(searched) >= set(SEARCHED)
