"""Stage `tune@cell`: a Ray Tune sweep of sloping factors and TTQ threshold (and lr, dropout).

Each trial starts from the FP checkpoint and trains the ternary model for a few epochs,
reporting ``val_ppl`` every epoch; ASHA stops poor trials early and Optuna proposes the next
ones. The first trial is the setting params.yaml gives the cell (``quant`` with its
``per_cell``), so a sweep always measures what it would replace. Ray starts locally, or
joins the cluster named by ``RAY_ADDRESS`` (then ``tune.storage`` must be a path every node
sees). Writes ``out_dir``: ``best.json`` (what ``train_ternary`` uses), ``trials.csv`` and
``sweep.png``.

Resumable: a rerun after the driver died restores the experiment (``Tuner.restore``) and does
not rerun finished trials; a trial whose worker dies resumes from its last checkpoint.
MLflow: one parent run for the sweep and one nested run per trial, live while the trial runs,
logged by this driver through Ray's ``MLflowLoggerCallback`` (the trials never write to the
store, so a local SQLite file sees one writer).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytorch_lightning as pl

from hitnet.language_model import CellType
from pipeline.builders import (
    build_task,
    build_trainer,
    compile_as_configured,
    datamodule_for,
    fingerprint,
    start_from_fp,
)
from pipeline.cli import cell_stage_parser, run_command
from pipeline.params import QUANT_SEARCHED, SEARCHED, Params, TuneParams, load_params
from pipeline.tracking import StageRun, resumable_stage_run, tracking_uri

LOG_UNIFORM = ("lambda_sigma", "lambda_tanh", "lr")  # searched, and plotted, on a log scale


def search_space(tune_params: TuneParams) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {
        "lambda_sigma": tune.loguniform(*tune_params.lambda_sigma),
        "lambda_tanh": tune.loguniform(*tune_params.lambda_tanh),
        "ttq_threshold": tune.uniform(*tune_params.ttq_threshold),
    }
    if tune_params.lr is not None:
        space["lr"] = tune.loguniform(*tune_params.lr)
    if tune_params.dropout is not None:
        space["dropout"] = tune.uniform(*tune_params.dropout)
    return space


def starting_point(params: Params, cell: CellType) -> dict[str, float] | None:
    """The searched values as ``params`` sets them for ``cell``: the sweep's first trial, so
    its best is never a setting it did not compare with the configured one. None when a value
    lies outside its searched range (Optuna would not take it)."""
    quant = params.quant.for_cell(cell)
    configured = {
        **{key: getattr(quant, key) for key in QUANT_SEARCHED},
        "lr": params.recipe("ternary", cell).lr,
        "dropout": params.dropout(cell, ternary=True),
    }
    space = search_space(params.tune.for_cell(cell))
    point = {key: configured[key] for key in space}
    own = params.tune.per_cell.get(cell)
    for key, value in point.items():
        low, high = space[key].lower, space[key].upper
        if not low <= value <= high:
            range_key = f"per_cell.{cell}.{key}" if getattr(own, key, None) else key
            print(
                f"tune@{cell}: no first trial at the configured setting: {key} {value} "
                f"is outside tune.{range_key} [{low}, {high}]",
                flush=True,
            )
            return None
    return point


def trial_params(params: Params, cell: CellType, config: dict[str, float]) -> Params:
    """``params`` with one trial's searched values and the sweep's per-trial budget."""
    searched = params.with_searched(config)
    recipe = searched.recipe("ternary", cell).model_copy(
        update={
            "epochs": params.tune.epochs,
            "limit_train_batches": params.tune.limit_train_batches,
            "limit_eval_batches": params.tune.limit_eval_batches,
        }
    )
    return searched.model_copy(update={"train_ternary": recipe})


TRIAL_CHECKPOINT = "trial.ckpt"  # the file in each Tune checkpoint


def report_to_tune() -> pl.Callback:
    """Ray's callback: after each epoch, ``train_ppl`` and ``val_ppl`` with the Trainer's
    checkpoint (Ray counts the reports as ``training_iteration``: the epoch)."""
    from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

    return TuneReportCheckpointCallback(
        ["train_ppl", "val_ppl"], filename=TRIAL_CHECKPOINT, on="train_epoch_end"
    )


class FailOnce(pl.Callback):
    """``tune.fail_at_epoch`` (tests only): the attempt raises as the next epoch starts, once
    epoch ``after_epoch`` is reported and checkpointed."""

    def __init__(self, after_epoch: int) -> None:
        self.after_epoch = after_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.after_epoch:
            raise RuntimeError(
                f"injected failure after epoch {self.after_epoch} (tune.fail_at_epoch)"
            )


def train_trial(
    config: dict[str, float], params_json: str, cell: CellType, data_dir: str, fp_checkpoint: str
) -> None:
    """One trial, run by a Ray worker: the ternary model from the FP checkpoint."""
    from ray import tune

    params = trial_params(Params.model_validate_json(params_json), cell, config)
    pl.seed_everything(params.seed, workers=True)
    datamodule = datamodule_for(params, Path(data_dir))
    task = build_task(params, cell, "ternary", datamodule.vocab_size)
    checkpoint = tune.get_checkpoint()
    # The attempt's files (a restored checkpoint, the Trainer's root) go with it.
    with tempfile.TemporaryDirectory() as scratch:
        resume_from = None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                resume_from = Path(scratch) / TRIAL_CHECKPOINT
                shutil.copyfile(Path(folder) / TRIAL_CHECKPOINT, resume_from)
        start_from_fp(task, Path(fp_checkpoint), load_weights=checkpoint is None)
        compile_as_configured(task, params.hardware)
        # Ray's report is the checkpoint callback (it saves the Trainer's checkpoint).
        callbacks = [report_to_tune()]
        if params.tune.fail_at_epoch is not None and checkpoint is None:  # a first attempt
            callbacks.append(FailOnce(params.tune.fail_at_epoch))
        trainer = build_trainer(params, params.train_ternary, Path(scratch) / "trainer", callbacks)
        trainer.fit(task, datamodule, ckpt_path=resume_from)


def guard_local_ray() -> None:
    """Gives a local Ray (no ``RAY_ADDRESS``) a random token, as a cluster has one: Ray 2.60's
    servers listen on every interface, with no setting to bind them to loopback, and run
    whatever code they are sent. Ray reads these variables when it is imported, so this
    must run before; once Ray is loaded it changes nothing."""
    if os.environ.get("RAY_ADDRESS") or "ray" in sys.modules:
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))


def connect_ray(num_gpus: int | None = None) -> None:
    """Joins ``RAY_ADDRESS``'s cluster, or starts a private local Ray (with ``num_gpus``
    GPUs when given, the first ones, else every GPU it finds)."""
    import ray

    # Workers get what they need through the runtime environment, not driver-only files.
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri()}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        print(f"tune: joining the Ray cluster at {address}", flush=True)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        # A new instance of this stage's own, never one someone else started (plain
        # ray.init() joins the machine's latest). Its node address is loopback, its servers
        # listen on every interface: the stage guards them with a token (guard_local_ray).
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_gpus=num_gpus,
            runtime_env=runtime_env,
            include_dashboard=False,
            log_to_driver=False,
        )


def build_tuner(
    params: Params,
    cell: CellType,
    data_dir: Path,
    fp_checkpoint: Path,
    name: str,
    start: dict[str, float] | None,
    parent_run_id: str | None = None,
):
    """The sweep's Tuner, or the restored one; ``start``: the first trial (starting_point).
    With ``parent_run_id``, every trial is a nested MLflow run under it while it runs (Ray's
    logger, in this driver: one writer)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    settings = params.tune.for_cell(cell)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial,
            params_json=params.model_dump_json(),
            cell=cell,
            data_dir=str(Path(data_dir).resolve()),
            fp_checkpoint=str(Path(fp_checkpoint).resolve()),
        ),
        {
            "cpu": settings.cpus_per_trial,
            "gpu": settings.trial_gpus(cluster_gpus),
        },
    )
    print(
        f"tune@{cell}: up to {settings.concurrent_trials(cluster_gpus)} trials at once, "
        f"{settings.trial_gpus(cluster_gpus):g} GPU and {settings.cpus_per_trial:g} CPU each "
        f"(the Ray cluster has {cluster_gpus:g} GPUs)",
        flush=True,
    )
    storage = str(Path(settings.storage).resolve())
    experiment = Path(storage) / name
    if tune.Tuner.can_restore(str(experiment)):
        print(f"tune: restoring {experiment}; finished trials are kept", flush=True)
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    if start is not None:
        print(f"tune@{cell}: first trial at the configured setting {start}", flush=True)
    searcher = OptunaSearch(seed=params.seed, points_to_evaluate=[start] if start else None)
    return tune.Tuner(
        trainable,
        param_space=search_space(settings),
        tune_config=tune.TuneConfig(
            metric="val_ppl",
            mode="min",
            num_samples=settings.num_samples,
            scheduler=ASHAScheduler(max_t=settings.epochs, grace_period=settings.grace_period),
            search_alg=ConcurrencyLimiter(
                searcher, max_concurrent=settings.concurrent_trials(cluster_gpus)
            ),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[trial_progress(f"tune@{cell}", settings.epochs)]
            + ([] if parent_run_id is None else [trial_logger(params, cell, parent_run_id)]),
            verbose=1,
        ),
    )


def trial_progress(name: str, epochs: int) -> Any:
    """A Tune callback: one line per trial epoch, as the training stages print, and a failed
    attempt's cause; the trials' own output stays in Ray's session folder
    (``log_to_driver=False``)."""
    from ray.tune import Callback  # imported here: Ray must not load before guard_local_ray

    class TrialProgress(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **_):
            print(
                f"{name} trial {trial.trial_id} epoch {result['training_iteration']}/{epochs}  "
                f"train_ppl {result['train_ppl']:.2f}  val_ppl {result['val_ppl']:.2f}",
                flush=True,
            )

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **_):
            print(f"{name} trial {trial.trial_id} failed: {_cause(trial)}; retrying", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **_):
            print(
                f"{name} trial {trial.trial_id} failed for good: {_cause(trial)} "
                f"(its traceback: {trial.error_file})",
                flush=True,
            )

    return TrialProgress()


def _cause(trial: Any) -> str:
    """The last line of a failed attempt's traceback, e.g. ``RuntimeError: ...``."""
    path = trial.error_file
    lines = Path(path).read_text().strip().splitlines() if path and Path(path).is_file() else []
    return lines[-1] if lines else "no traceback recorded"


def trial_logger(params: Params, cell: CellType, parent_run_id: str):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(
        tracking_uri=tracking_uri(),
        experiment_name=params.tracking.experiment,
        tags={"mlflow.parentRunId": parent_run_id, "dvc.stage": f"tune@{cell}"},
    )


def trial_table(grid: Any, configured: dict[str, float] | None) -> pd.DataFrame:
    """One row per trial of a ``ResultGrid``: its searched values, whether it ran the
    configured setting, the address of the Ray node it ran on, its best ``val_ppl`` (Ray's
    row of the trial's minimum), the epochs it ran (its last ``training_iteration``) and the
    last line of its error, if any."""
    best = grid.get_dataframe(filter_metric="val_ppl", filter_mode="min")
    best_val = best.reindex(columns=["trial_id", "val_ppl"]).set_index("trial_id")["val_ppl"]
    table = pd.DataFrame(
        {
            "trial_id": result.metrics.get("trial_id", Path(result.path).name),
            **{key: result.config[key] for key in SEARCHED if key in result.config},
            "configured": configured is not None
            and all(result.config.get(key) == value for key, value in configured.items()),
            "node_ip": result.metrics.get("node_ip", ""),  # the Ray node that ran it last
            "epochs": int(result.metrics.get("training_iteration", 0)),
            "error": "" if result.error is None else _last_line(str(result.error)),
        }
        for result in grid
    )
    table.insert(len(table.columns) - 2, "best_val_ppl", table["trial_id"].map(best_val))
    return table.sort_values("trial_id", ignore_index=True)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else text


def choose(trials: pd.DataFrame, horizon: int) -> dict[str, Any]:
    """best.json: the best trial of those that ran the whole horizon (ASHA stops the others
    early, so their val is not comparable), and whether it is the configured setting (the
    first trial, ``configured``) or one the sweep found. The configured setting keeps its
    place unless a trial beats it at the horizon.

    Hand-written: ``ResultGrid.get_best_result`` can neither leave out the trials ASHA
    stopped nor prefer the configured setting on a tie."""
    finished = trials[trials["epochs"] > 0]
    if finished.empty:
        raise RuntimeError("tune: no trial reported a val_ppl; see the Ray logs above")
    full = finished[finished["epochs"] >= horizon]
    ranked = (full if len(full) else finished).sort_values(
        ["best_val_ppl", "configured"], ascending=[True, False], kind="stable"
    )
    best = ranked.iloc[0]
    configured = finished[finished["configured"]]
    chosen: dict[str, Any] = {key: round(float(best[key]), 6) for key in SEARCHED if key in best}
    chosen["val_ppl"] = round(float(best["best_val_ppl"]), 4)  # no trial id: it is random
    chosen["winner"] = "configured" if best["configured"] else "sweep"
    chosen["configured_val_ppl"] = (
        round(float(configured["best_val_ppl"].iloc[0]), 4) if len(configured) else None
    )
    return chosen


def write_outputs(trials: pd.DataFrame, out_dir: Path, horizon: int) -> dict[str, Any]:
    """best.json, trials.csv (pandas quotes what needs it) and sweep.png; returns best.json."""
    best_json = choose(trials, horizon)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "best.json").write_text(json.dumps(best_json, indent=2, sort_keys=True) + "\n")
    trials.to_csv(out_dir / "trials.csv", index=False)
    searched = [key for key in SEARCHED if key in best_json]
    finished = trials[trials["epochs"] > 0]
    figure, axes = plt.subplots(1, len(searched), figsize=(4.5 * len(searched), 4))
    for axis, key in zip(axes, searched, strict=True):
        axis.scatter(finished[key], finished["best_val_ppl"])
        axis.scatter([best_json[key]], [best_json["val_ppl"]], color="red", label="chosen")
        axis.set(xlabel=key, ylabel="best val_ppl", yscale="log")
        if key in LOG_UNIFORM:
            axis.set_xscale("log")
        axis.legend(fontsize=8)
    figure.suptitle("sweep: validation perplexity against the searched parameters")
    figure.tight_layout()
    figure.savefig(out_dir / "sweep.png", dpi=110)
    plt.close(figure)
    return best_json


def used_params(params: Params, cell: CellType) -> dict:
    """What a sweep depends on (dvc.yaml's params of the stage; the resume fingerprint)."""
    sections = {"seed", "data", "model", "quant", "train_ternary", "tune", "hardware"}
    return params.used_by_cell(sections, cell)


def sweep(
    params: Params, cell: CellType, data_dir: Path, fp_checkpoint: Path, out_dir: Path
) -> dict[str, Any]:
    """Runs (or restores) the sweep for one cell; returns the best setting."""
    import ray

    if not Path(fp_checkpoint).is_file():
        raise FileNotFoundError(f"{fp_checkpoint}: no FP checkpoint for the sweep to start from")
    used = {**used_params(params, cell), "cell": cell}
    name = f"tune-{cell}-{fingerprint(used, fp_checkpoint)}"
    # beside the Tune experiment it belongs to: a restored sweep goes on in the same run
    run_id_file = Path(params.tune.storage).resolve() / f"{name}.mlflow_run_id"
    start = starting_point(params, cell)  # once: it says why when there is none
    with resumable_stage_run(params.tracking, f"tune@{cell}", used, run_id_file) as parent:
        connect_ray()
        try:
            parent_run_id = parent.run_id if isinstance(parent, StageRun) else None
            tuner = build_tuner(params, cell, data_dir, fp_checkpoint, name, start, parent_run_id)
            trials = trial_table(tuner.fit(), start)
        finally:
            ray.shutdown()
        best = write_outputs(trials, Path(out_dir), params.tune.epochs)
        if isinstance(parent, StageRun):
            parent.log_metrics({"best_val_ppl": best["val_ppl"]}, step=0)
            for artifact in ("best.json", "trials.csv", "sweep.png"):
                parent.log_artifact(Path(out_dir) / artifact)
    run_id_file.unlink()  # finished and recorded: a forced rerun is a run of its own
    print(f"tune@{cell}: best {best}", flush=True)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = cell_stage_parser(__doc__)
    parser.add_argument("--init", type=Path, help="default: runs/fp/<cell>/model.ckpt")
    parser.add_argument("--out", type=Path, help="default: runs/tune/<cell>")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    init = args.init or Path("runs/fp") / args.cell / "model.ckpt"
    guard_local_ray()
    sweep(params, args.cell, args.data, init, args.out or Path("runs/tune") / args.cell)


if __name__ == "__main__":
    run_command(main)
