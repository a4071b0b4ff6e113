"""Ray Tune sweeps: search space, per-trial params, resume after the driver dies, a real
multi-process Ray cluster on loopback."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from pydantic import ValidationError
from ray import tune

from pipeline.params import Params, ParamsError, parse_params
from pipeline.tune import choose, search_space, starting_point, trial_params, write_outputs
from tests.conftest import REPO_ROOT
from tests.pipeline.conftest import make_smoke_project, run_tool, tool_env, write_params
from tests.pipeline.services import (
    free_port,
    own_ray,
    processes_started_with,
    start_local_sweep_ray,
    stop_processes_started_with,
)


def test_search_space_is_log_uniform_for_slopes_and_uniform_for_the_threshold():
    tune_params = {"lambda_sigma": [0.5, 4.0], "lr": [1.0, 20.0], "dropout": [0.1, 0.5]}
    params = Params.model_validate({"tune": tune_params})
    space = search_space(params.tune)
    assert set(space) == {"lambda_sigma", "lambda_tanh", "ttq_threshold", "lr", "dropout"}
    assert isinstance(space["dropout"].get_sampler(), tune.search.sample.Float._Uniform)
    assert isinstance(space["lambda_sigma"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["ttq_threshold"].get_sampler(), tune.search.sample.Float._Uniform)
    assert (space["lambda_sigma"].lower, space["lambda_sigma"].upper) == (0.5, 4.0)
    assert not {"lr", "dropout"} & set(search_space(Params().tune))  # only when given a range


def test_trial_params_take_the_trial_values_and_the_sweep_budget():
    params = Params.model_validate({"tune": {"epochs": 3, "limit_train_batches": 7}})
    config = {"lambda_sigma": 2.5, "lambda_tanh": 1.5, "ttq_threshold": 0.9, "lr": 4.0}
    trial = trial_params(params, "lstm", config)
    assert (trial.quant.lambda_sigma, trial.quant.lambda_tanh) == (2.5, 1.5)
    assert trial.quant.ttq_threshold == 0.9 and trial.train_ternary.lr == 4.0
    assert trial.train_ternary.epochs == 3 and trial.train_ternary.limit_train_batches == 7
    best = params.with_searched({"lambda_sigma": 2.5, "lambda_tanh": 1.5, "ttq_threshold": 0.9})
    assert best.train_ternary.epochs == params.train_ternary.epochs  # the full recipe stays


def test_trials_take_their_cells_recipe_but_the_sweeps_budget_and_lr():
    gru = {"lr": 2.0, "dropout": 0.2, "epochs": 40}
    params = Params.model_validate(
        {"tune": {"epochs": 3}, "train_ternary": {"lr": 10.0, "per_cell": {"gru": gru}}}
    )
    searched = {"lambda_sigma": 1.0, "lambda_tanh": 1.0, "ttq_threshold": 0.7}
    trial = trial_params(params, "gru", searched)
    assert (trial.train_ternary.lr, trial.train_ternary.epochs) == (2.0, 3)
    assert trial.build_model_config("gru", 50, ternary=True).dropout == 0.2
    assert trial_params(params, "lstm", searched).train_ternary.lr == 10.0
    assert trial_params(params, "gru", {**searched, "lr": 4.0}).train_ternary.lr == 4.0
    trial = trial_params(params, "gru", {**searched, "dropout": 0.35})
    assert trial.build_model_config("gru", 50, ternary=True).dropout == 0.35


def test_a_sweep_starts_at_the_cells_configured_setting(capsys):
    quant = {"per_cell": {"lstm": {"lambda_sigma": 2.0, "ttq_threshold": 0.5}}}
    recipe = {"lr": 10.0, "per_cell": {"gru": {"lr": 2.0, "dropout": 0.2}}}
    params = Params.model_validate({"quant": quant, "train_ternary": recipe})
    lstm = {"lambda_sigma": 2.0, "lambda_tanh": 1.0, "ttq_threshold": 0.5}
    assert starting_point(params, "lstm") == lstm
    searching = params.model_copy(
        update={"tune": params.tune.model_copy(update={"lr": (1.0, 20.0), "dropout": (0.1, 0.5)})}
    )
    gru = {"lambda_sigma": 1.0, "lambda_tanh": 1.0, "ttq_threshold": 0.7, "lr": 2.0}
    assert starting_point(searching, "gru") == {**gru, "dropout": 0.2}
    assert starting_point(searching, "lstm") == {**lstm, "lr": 10.0, "dropout": 0.5}
    # A configured value outside its searched range: no first trial, and a line says why.
    narrow = params.model_copy(
        update={"tune": params.tune.model_copy(update={"ttq_threshold": (0.6, 1.0)})}
    )
    assert starting_point(narrow, "lstm") is None
    assert "ttq_threshold 0.5 is outside tune.ttq_threshold [0.6, 1.0]" in capsys.readouterr().out
    assert starting_point(narrow, "gru") is not None


def test_a_cell_searches_its_own_range_where_it_has_one(capsys):
    tune = {"lr": [1.0, 20.0], "per_cell": {"gru": {"lr": [0.5, 4.0]}}}
    recipe = {"lr": 10.0, "per_cell": {"gru": {"lr": 2.0}}}
    params = Params.model_validate({"tune": tune, "train_ternary": recipe})
    gru, lstm = (
        search_space(params.tune.for_cell("gru")),
        search_space(params.tune.for_cell("lstm")),
    )
    assert (gru["lr"].lower, gru["lr"].upper) == (0.5, 4.0)
    assert (lstm["lr"].lower, lstm["lr"].upper) == (1.0, 20.0)
    assert gru["lambda_sigma"].upper == lstm["lambda_sigma"].upper == 4.0  # the shared range
    assert starting_point(params, "gru")["lr"] == 2.0
    # the LSTM's lr 10 lies outside the GRU's range: the line names the key to edit
    wide = Params.model_validate({"tune": tune, "train_ternary": {"lr": 10.0}})
    assert starting_point(wide, "gru") is None
    assert "lr 10.0 is outside tune.per_cell.gru.lr [0.5, 4.0]" in capsys.readouterr().out
    with pytest.raises(ValidationError, match=r"tune\.per_cell\.gru\.lr must be \[low, high\]"):
        Params.model_validate({"tune": {"per_cell": {"gru": {"lr": [4.0, 0.5]}}}})


def test_a_trials_values_win_over_the_cells_own_quant_values():
    quant = {"per_cell": {"lstm": {"lambda_sigma": 2.0, "lambda_tanh": 2.0}}}
    params = Params.model_validate({"quant": quant})
    config = {"lambda_sigma": 0.8, "lambda_tanh": 3.0, "ttq_threshold": 0.9}
    model = trial_params(params, "lstm", config).build_model_config("lstm", 50, ternary=True)
    assert (model.lambda_sigma, model.lambda_tanh, model.quant.ttq_threshold) == (0.8, 3.0, 0.9)


def _row(val: float, epochs: int, configured: bool = False, sigma: float = 1.0) -> dict:
    return {
        "lambda_sigma": sigma,
        "lambda_tanh": 1.0,
        "ttq_threshold": 0.5,
        "best_val_ppl": val,
        "epochs": epochs,
        "configured": configured,
    }


def test_the_configured_setting_keeps_its_place_unless_a_trial_beats_it_at_the_horizon():
    configured = _row(120.0, epochs=4, configured=True, sigma=2.0)
    worse, stopped_early = _row(125.0, epochs=4, sigma=0.7), _row(118.0, epochs=1, sigma=3.0)
    kept = choose(pd.DataFrame([configured, worse, stopped_early]), horizon=4)
    # the early-stopped trial's val is of another epoch: not comparable
    assert kept["winner"] == "configured" and kept["lambda_sigma"] == 2.0
    assert kept["val_ppl"] == kept["configured_val_ppl"] == 120.0
    found = choose(pd.DataFrame([configured, _row(119.5, epochs=4, sigma=1.5)]), horizon=4)
    assert (found["winner"], found["lambda_sigma"], found["val_ppl"]) == ("sweep", 1.5, 119.5)
    assert found["configured_val_ppl"] == 120.0
    tie = choose(pd.DataFrame([_row(120.0, epochs=4, sigma=1.5), configured]), horizon=4)
    assert tie["winner"] == "configured"  # a trial must beat it, not equal it
    no_first_trial = choose(pd.DataFrame([worse]), horizon=4)
    assert no_first_trial["winner"] == "sweep" and no_first_trial["configured_val_ppl"] is None
    none_full = choose(pd.DataFrame([stopped_early, _row(130.0, epochs=2)]), horizon=4)
    assert none_full["lambda_sigma"] == 3.0  # no trial ran the horizon: the best that ran
    with pytest.raises(RuntimeError, match="no trial reported"):
        choose(pd.DataFrame([_row(float("nan"), epochs=0)]), horizon=4)


def test_trials_csv_quotes_what_needs_quoting_and_reads_back_as_written(tmp_path):
    error = 'RuntimeError: training diverged: the val loss is nan, "lr 20"'
    trials = pd.DataFrame(
        [
            {**_row(120.0, epochs=4), "trial_id": "a1", "error": ""},
            {**_row(float("nan"), epochs=0, sigma=2.0), "trial_id": "b2", "error": error},
        ]
    )
    write_outputs(trials, tmp_path, horizon=4)
    read = pd.read_csv(tmp_path / "trials.csv", keep_default_na=False, na_values=[""])
    assert read["error"].fillna("").tolist() == ["", error]
    assert read["lambda_sigma"].tolist() == [1.0, 2.0] and read["epochs"].tolist() == [4, 0]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("cluster_gpus", "trial_gpus", "concurrent"),
    [(0, 0.0, 8), (0.5, 0.125, 8), (1, 0.125, 8), (2, 0.125, 16), (8, 0.125, 64)],
)
def test_by_default_trials_share_every_gpu_of_the_cluster(cluster_gpus, trial_gpus, concurrent):
    auto = Params.model_validate({"tune": {"max_concurrent": 8}}).tune
    assert auto.gpus_per_trial == "auto"
    assert auto.trial_gpus(cluster_gpus) == trial_gpus
    assert auto.concurrent_trials(cluster_gpus) == concurrent


def test_a_fixed_gpu_share_keeps_max_concurrent_as_the_total():
    fixed = Params.model_validate({"tune": {"gpus_per_trial": 0.5}}).tune
    assert [fixed.trial_gpus(gpus) for gpus in (0, 4)] == [0.5, 0.5]
    assert [fixed.concurrent_trials(gpus) for gpus in (0, 4)] == [4, 4]


@pytest.mark.parametrize(
    ("tune_params", "message"),
    [
        ({"lambda_sigma": [3.0, 1.0]}, "tune.lambda_sigma must be [low, high] with low < high"),
        ({"ttq_threshold": [0.5]}, "tune.ttq_threshold"),
        ({"lambda_tanh": [-1.0, 2.0]}, "tune.lambda_tanh"),
        ({"grace_period": 5, "epochs": 2}, "tune.grace_period must be <= tune.epochs"),
        ({"gpus_per_trial": -0.5}, "tune.gpus_per_trial"),
        ({"gpus_per_trial": "all"}, "tune.gpus_per_trial"),
        ({"dropout": [0.2, 1.0]}, "tune.dropout"),
        ({"dropout": [0.5, 0.2]}, "tune.dropout must be [low, high] with low < high"),
    ],
)
def test_bad_tune_params_are_rejected(tune_params, message):
    with pytest.raises(ParamsError) as error:
        parse_params({"tune": tune_params})
    assert message in str(error.value)


# A sweep of stand-in trials (val_ppl per epoch by lambda_sigma; None: the attempt raises),
# read back by the tune stage's own table and outputs.
FAKE_SWEEP = """
import sys
from pathlib import Path
from pipeline.tune import connect_ray, guard_local_ray, trial_table, write_outputs
guard_local_ray()
connect_ray()
import ray
from ray import tune
VALS = {1.0: [300.0, 200.0, 250.0], 2.0: [280.0], 3.0: [310.0, None], 4.0: [None]}
def trial(config):
    for val in VALS[config["lambda_sigma"]]:
        if val is None:
            raise RuntimeError("training diverged, at lr 20")
        tune.report({"val_ppl": val, "train_ppl": val + 1})
space = {"lambda_sigma": tune.grid_search(list(VALS)), "lambda_tanh": 1.0, "ttq_threshold": 0.5}
run = tune.RunConfig(storage_path=sys.argv[1], name="fake", verbose=0)
grid = tune.Tuner(trial, param_space=space, run_config=run).fit()
table = trial_table(grid, {"lambda_sigma": 2.0, "lambda_tanh": 1.0, "ttq_threshold": 0.5})
write_outputs(table, Path(sys.argv[1]) / "out", horizon=3)
ray.shutdown()
"""


@pytest.mark.slow
def test_the_trial_table_holds_each_trials_best_val_its_epochs_and_its_error(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    with own_ray(env) as env:
        swept = subprocess.run(
            [sys.executable, "-c", FAKE_SWEEP, str(tmp_path)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert swept.returncode == 0, swept.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "out" / "trials.csv").set_index("lambda_sigma")
    assert trials["best_val_ppl"].fillna(0).to_dict() == {1.0: 200, 2.0: 280, 3.0: 310, 4.0: 0}
    assert trials["epochs"].to_dict() == {1.0: 3, 2.0: 1, 3.0: 1, 4.0: 0}
    assert trials["configured"].to_dict() == {1.0: False, 2.0: True, 3.0: False, 4.0: False}
    errors = trials["error"].fillna("").to_dict()
    assert errors[1.0] == errors[2.0] == "" and errors[3.0] == errors[4.0]
    assert errors[3.0].endswith("RuntimeError: training diverged, at lr 20")
    assert trials["trial_id"].str.fullmatch(r"\w+").all()
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    # the one trial that ran the horizon wins, although its last val (250) is worse
    assert (best["lambda_sigma"], best["val_ppl"], best["winner"]) == (1.0, 200.0, "sweep")
    assert best["configured_val_ppl"] == 280.0


@pytest.fixture(scope="module")
def fp_project(tmp_path_factory) -> Path:
    """A smoke project whose FP LSTM is trained, with a sweep of one trial at a time."""
    project = make_smoke_project(tmp_path_factory.mktemp("tune") / "project")
    write_params(
        project,
        {"tune": {"num_samples": 3, "max_concurrent": 1, "fail_at_epoch": None, "epochs": 2}},
    )
    run_tool(project, "dvc", "repro", "train_fp@lstm")
    return project


def _sweep(project: Path, env: dict[str, str], out: str) -> subprocess.CompletedProcess:
    """The tune stage's command for the LSTM, as DVC runs it, into ``runs/<out>``."""
    return subprocess.run(
        ["python", "-m", "pipeline.tune", "lstm", "--out", f"runs/{out}"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )


def _started_trials(output: str) -> list[str]:
    return re.findall(r"Trial (train_trial_\w+) started", output)


def _ran_the_configured_setting(trial_rows: list[str]) -> bool:
    """One trial ran params.yaml's own LSTM setting (quant.per_cell.lstm: 2, 2, 0.5)."""
    return ["2.0", "2.0", "0.5"] in [row.split(",")[1:4] for row in trial_rows]


@pytest.mark.slow
def test_a_killed_driver_resumes_the_sweep_without_rerunning_finished_trials(fp_project):
    log = fp_project / "first.log"
    scratch = Path(tempfile.mkdtemp(prefix="trials-"))  # the trials' temp folders go here
    with own_ray({**tool_env(fp_project), "TMPDIR": str(scratch)}) as env, log.open("w") as out:
        driver = subprocess.Popen(
            ["python", "-m", "pipeline.tune", "lstm", "--out", "runs/tune-resume"],
            cwd=fp_project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 240
        finished: list[str] = []
        while not finished:
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            finished = re.findall(r"Trial (train_trial_\w+) completed", log.read_text())
            time.sleep(0.2)
        # while the sweep runs, its finished trial is in MLflow already: a nested run with val
        client = MlflowClient(tracking_uri=f"sqlite:///{fp_project / 'mlflow.db'}")
        (experiment,) = client.search_experiments(filter_string="name = 'hitnet-ptb'")
        live = client.search_runs([experiment.experiment_id], "tags.`dvc.stage` = 'tune@lstm'")
        assert any(
            "mlflow.parentRunId" in run.data.tags and "val_ppl" in run.data.metrics for run in live
        ), [(run.data.tags.get("mlflow.runName"), run.data.metrics) for run in live]
        assert driver.poll() is None  # read mid-sweep
        time.sleep(3)  # let Tune write its experiment state once more
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        stop_processes_started_with(f"RAY_TMPDIR={env['RAY_TMPDIR']}")  # its Ray, as a crash

        rerun = _sweep(fp_project, env, "tune-resume")
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert "restoring" in output
    assert finished[0] not in _started_trials(output)  # a finished trial was not rerun
    rows = (fp_project / "runs/tune-resume/trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 3
    assert "first trial at the configured setting" in log.read_text()
    assert _ran_the_configured_setting(rows)
    # the killed driver's MLflow run went on: no orphan RUNNING parent (a fault once)
    sweeps = client.search_runs([experiment.experiment_id], "tags.`dvc.stage` = 'tune@lstm'")
    parents = [run for run in sweeps if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["FINISHED"]
    # every attempt's scratch folder (restored checkpoint, Trainer root) went with it
    assert not list(scratch.rglob("*.ckpt"))


@pytest.mark.slow
def test_a_retried_trial_leaves_no_checkpoint_in_the_temp_folder(fp_project):
    """Fault: each restored attempt copied its checkpoint to ``tempfile.mkdtemp()/trial.ckpt``
    and left it there, one more file in the machine's temp folder per retry."""
    storage = "ray_results_retry"  # a sweep of its own, not one the other tests restore
    write_params(fp_project, {"tune": {"num_samples": 1, "fail_at_epoch": 1, "storage": storage}})
    scratch = Path(tempfile.mkdtemp(prefix="trials-"))  # the trials' temp folders go here
    with own_ray({**tool_env(fp_project), "TMPDIR": str(scratch)}) as env:
        retried = _sweep(fp_project, env, "tune-retry")
    assert retried.returncode == 0, (retried.stdout + retried.stderr)[-3000:]
    # the trial failed after epoch 1 and its next attempt restored that epoch's checkpoint
    assert list((fp_project / storage).rglob("error.txt"))
    assert len((fp_project / "runs/tune-retry/trials.csv").read_text().splitlines()) == 1 + 1
    assert not list(scratch.rglob("*.ckpt"))
    shutil.rmtree(scratch)


WORKER_IPS = ("127.0.0.2", "127.0.0.3")


@pytest.mark.slow
def test_a_sweep_spreads_its_trials_over_every_gpu_of_an_existing_ray_cluster(fp_project):
    """A CPU stand-in for a multi-GPU cluster: two loopback nodes with one fake GPU each
    (``--num-gpus``); with ``max_concurrent: 1`` and ``gpus_per_trial: auto``, each GPU runs
    one trial at a time, so two trials run at once, one on each node."""
    # A storage of its own: the resume test's finished sweep has the same fingerprint, and
    # restoring it would run no trial on this cluster.
    storage = {"storage": "ray_results_cluster", "num_samples": 3, "fail_at_epoch": None}
    write_params(fp_project, {"tune": storage})  # what the retry test changed, back
    # Ray 2.60 authenticates every node and driver with one shared token.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = [
        "ray",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    workers = [  # each its own loopback address, so trials.csv tells them apart
        [
            *("ray", "start", f"--address={address}", f"--node-ip-address={ip}"),
            *("--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"),
        ]
        for ip in WORKER_IPS
    ]
    with own_ray({**tool_env(fp_project), **token}) as env:
        for command in (head, *workers):
            started = subprocess.run(command, env=env, capture_output=True, text=True)
            assert started.returncode == 0, started.stdout + started.stderr
        deadline = time.monotonic() + 60
        status = ""
        while status.count("node_") < 3:  # head + workers, once the autoscaler reports them
            assert time.monotonic() < deadline, status
            time.sleep(1)
            status = subprocess.run(
                ["ray", "status", f"--address={address}"], env=env, capture_output=True, text=True
            ).stdout

        sweep = _sweep(fp_project, {**env, "RAY_ADDRESS": address}, "tune-cluster")
        # Without RAY_ADDRESS a sweep starts a Ray of its own, even with this cluster the
        # machine's latest (fault: plain ray.init() joined whatever cluster ran last). Its
        # range leaves the configured threshold (0.5) out: a new sweep, which says so once.
        write_params(fp_project, {"tune": {"ttq_threshold": [0.6, 1.2]}})
        alone = _sweep(fp_project, env, "tune-alone")
        marker = f"RAY_TMPDIR={env['RAY_TMPDIR']}"
    alone_output = alone.stdout + alone.stderr
    assert alone.returncode == 0, alone_output[-3000:]
    assert "Connecting to existing Ray cluster" not in alone_output
    assert "joining the Ray cluster" not in alone_output
    assert alone_output.count("no first trial at the configured setting") == 1  # printed twice once
    output = sweep.stdout + sweep.stderr
    assert sweep.returncode == 0, output[-3000:]
    assert f"joining the Ray cluster at {address}" in output and "restoring" not in output
    assert "up to 2 trials at once, 1 GPU and 1 CPU each (the Ray cluster has 2 GPUs)" in output
    rows = (fp_project / "runs/tune-cluster/trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(row.endswith(",") for row in rows)  # no error column
    assert _ran_the_configured_setting(rows)
    # The head offers no CPU: the trials ran on the workers, on both of them.
    trials = pd.read_csv(fp_project / "runs/tune-cluster/trials.csv")
    assert set(trials["node_ip"]) == set(WORKER_IPS), trials.to_string()
    assert processes_started_with(marker) == [], "this test's Ray processes left behind"


@pytest.mark.slow
def test_a_local_sweeps_ray_refuses_a_driver_without_its_token():
    """Fault: a local sweep's Ray listens on every interface (Ray 2.60 cannot bind it to
    loopback) and runs whatever code it is sent; the tune stage now guards it with a token."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    with own_ray(env) as env:
        local, address = start_local_sweep_ray(env)
        stranger = subprocess.run(
            [sys.executable, "-c", f"import ray; ray.init(address='{address}'); print('in')"],
            env={key: value for key, value in env.items() if key != "RAY_TMPDIR"},
            capture_output=True,
            text=True,
            timeout=180,
        )
        local.kill()
    assert re.fullmatch(r"[\d.]+:\d+", address), address
    assert stranger.returncode != 0 and "in" not in stranger.stdout.splitlines()
    assert "Authentication token is missing or incorrect" in stranger.stderr


def _listening_ips(pids: list[int]) -> set[str]:
    """The IP addresses the TCP sockets of these processes listen on, read from /proc."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ips = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words, little-endian
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                ips.add(str(ipaddress.ip_address(raw)))
    return ips


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Ray 2.60's servers listen on every interface, with no setting to bind them to "
    "loopback; a token guards them (issue 21, item 9)",
)
def test_a_local_sweeps_ray_listens_on_loopback_only():
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    with own_ray(env) as env:
        local, address = start_local_sweep_ray(env)
        if not address:
            raise RuntimeError("the local Ray did not start")  # a real failure, not the xfail
        ips = _listening_ips(processes_started_with(f"RAY_TMPDIR={env['RAY_TMPDIR']}"))
        local.kill()
    if not ips:
        raise RuntimeError("no listening socket found")  # the /proc reading went wrong
    loopback = {ip for ip in ips if ipaddress.ip_address(ip).is_loopback}
    assert ips == loopback, f"listening on {sorted(ips)}"
