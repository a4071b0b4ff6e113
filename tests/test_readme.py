"""README's results tables are the pipeline's files, not typed numbers: each figure is checked
against the file under results/ it comes from. The same holds for the figures of the search
history that moved from README to results/README.md."""

from __future__ import annotations

import csv
import itertools
import json
import re
import statistics

import pytest

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = REPO_ROOT / "results"
HISTORY = (RESULTS / "README.md").read_text(encoding="utf-8")


def _flat(text: str) -> str:
    """``text`` with every run of whitespace (line breaks too) as one space."""
    return " ".join(text.split())


def _row(first_cell: str) -> list[str]:
    """The cells of README's table row that starts with ``first_cell``, bold marks removed."""
    (line,) = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")][1:]


def _metrics(path: str) -> dict:
    return json.loads((RESULTS / path).read_text(encoding="utf-8"))


def test_the_one_seed_table_is_the_reports_files():
    drawn, rounded = (
        _metrics("h100/report/metrics.json"),
        _metrics("h100/report-rounded/metrics.json"),
    )
    for cell, paper in (("lstm", ["97.2", "110.3", "126"]), ("gru", ["102.7", "113.5", "142"])):
        fp, mean, std = (
            drawn[f"{cell}_{key}"]
            for key in ("fp_test_ppl", "ternary_test_ppl", "ternary_test_ppl_std")
        )
        assert _row(cell.upper()) == [
            f"{fp:.1f}",
            f"{mean:.1f} ± {std:.1f}",
            f"{rounded[f'{cell}_ternary_test_ppl']:.1f}",
            f"{mean - fp:+.1f}",
            *paper,
        ]


def test_the_training_seed_table_is_the_runs_files():
    runs = [_metrics(f"h200/search12/l-m35-s{seed}/metrics.json") for seed in range(3)]
    for label, key in (
        ("test PPW, BTQ rounded (the stage's test)", "test_ppl"),
        ("best val PPW, BTQ rounded", "val_ppl"),
    ):
        values = [run[key] for run in runs]
        spread = f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert _row(label)[:4] == [*(f"{value:.2f}" for value in values), spread]


def test_the_wall_times_are_the_drivers_clock_stamps():
    stamps = _metrics("h200/search12/timing.json")
    fp = stamps["fp_done"] - stamps["start"]
    ternary = stamps["ternary_lstm_done"] - stamps["fp_done"]
    assert f"both FP models at once, {fp} s; three ternary LSTMs at" in _flat(README)
    assert f"once, 66 epochs, {ternary} s" in _flat(README)


def _csv_rows(path: str) -> list[dict[str, str]]:
    with open(REPO_ROOT / path, newline="") as rows:
        return list(csv.DictReader(rows))


def test_the_full_size_repro_figures_are_its_files():
    """The committed run's figures: its timings, its FP histories, the sweeps' best.json."""
    timing = _metrics("h200/repro/timing-full.json")
    fp = max(timing["train_fp@lstm"], timing["train_fp@gru"])
    assert (
        f"through both sweeps on one H200 in {timing['total']:.0f} s (`results/h200/repro.md`): "
        f"prepare {timing['prepare']:.0f} s, both FP models at once {fp:.0f} s"
    ) in _flat(README)
    assert f"{timing['tune@gru']:.0f} s (GRU) and {timing['tune@lstm']:.0f} s (LSTM)" in _flat(
        README
    )
    for cell in ("lstm", "gru"):  # "equal the H100's hand-run stage in every value"
        ours = _csv_rows(f"runs/fp/{cell}/history.csv")
        assert len(ours) == 40 and ours == _csv_rows(f"results/h100/runs/fp/{cell}/history.csv")
    lstm, gru = (
        json.loads((REPO_ROOT / f"runs/tune/{c}/best.json").read_text()) for c in ("lstm", "gru")
    )
    assert lstm["winner"] == "sweep" and gru["winner"] == "configured"
    assert (
        f"(val {lstm['val_ppl']:.2f} against {lstm['configured_val_ppl']:.2f}: slopes "
        f"{lstm['lambda_sigma']:.2f} and {lstm['lambda_tanh']:.2f}, TTQ theta "
        f"{lstm['ttq_threshold']:.2f}, lr {lstm['lr']:.1f}, dropout {lstm['dropout']:.2f})"
    ) in _flat(README)
    trials = _csv_rows("runs/tune/gru/trials.csv")
    others = [float(row["best_val_ppl"]) for row in trials if row["configured"] == "False"]
    assert len(others) == 15
    assert (
        f"its configured setting ({gru['val_ppl']:.2f}; the best other trial, {min(others):.2f})"
        in _flat(README)
    )


def test_the_gpu_ternary_stage_with_the_shared_graph_repeats_the_published_run():
    ours = _csv_rows("results/h200/repro/ternary-lstm-seed0-history.csv")
    published = _csv_rows("results/h100/runs/ternary/lstm/history.csv")
    assert ours == published[: len(ours)]
    assert f"repeats the published run in every value for the {len(ours)} epochs it ran" in (
        _flat(README)
    )


def test_the_compile_cache_figure_is_the_benchs_file():
    rows = _metrics("cpu_compile_cache.json")["rows"]
    assert rows[0]["ratio"] == 1.0
    assert f"compiles in {rows[1]['ratio']:.2f}x the cold time on a CPU" in _flat(README)


def test_the_sweep_horizons_rank_correlation_is_the_benchs_table():
    table = (RESULTS / "h100" / "horizon_rank.md").read_text(encoding="utf-8")

    def row(k: int) -> list[str]:
        # the first table: final = the run's best val, the figure README gives
        line = next(line for line in table.splitlines() if line.startswith(f"| {k} |"))
        return [cell.strip() for cell in line.strip("|").split("|")]

    _, n_lstm, rho_lstm, n_gru, rho_gru, *_ = row(4)
    assert f"Spearman rho {rho_lstm} (LSTM, {n_lstm} runs) and {rho_gru} (GRU, {n_gru} runs)" in (
        " ".join(README.split())
    )
    assert f"at k = 1 the GRU's is {row(1)[4]}" in " ".join(README.split())


def test_the_cpu_speed_and_size_figures_are_the_benchs_table():
    text = (RESULTS / "cpu_packed_inference.txt").read_text(encoding="utf-8")
    timed = text.split("# Fully ternary")[0]  # then the sizes-only run
    sections = dict(re.findall(r"^\[(\w+)\] (.*?)(?=^\[|\Z)", timed, re.M | re.S))

    def speed(cell: str, batch: int) -> str:  # the packed model's tokens/s over FP32's
        ratio = re.search(
            rf"^ +{batch} ternary from the packed file +\S+ +(\S+)", sections[cell], re.M
        )
        return f"{1 / float(ratio.group(1)):.2f}x"

    readme = " ".join(README.split())
    assert f"at {speed('lstm', 1)} (batch 1) and {speed('lstm', 10)} (batch 10)" in readme
    assert f"(GRU: {speed('gru', 1)}, {speed('gru', 10)})" in readme
    assert "file 24,290,377 bytes, FP32 parameters 26,929,600 bytes" in text
    assert "24.3 MB against 26.9 MB of FP32 parameters (1.11x)" in readme
    assert "[lstm] file 1,790,657 bytes" in text and "it is 1.79 MB (15.0x)" in readme


def test_the_short_recipe_figures_are_the_runs_files():
    """Round thirteen's figures, in the search history (results/README.md)."""
    tests = [_metrics(f"h200/search13/l36-s{seed}/metrics.json")["test_ppl"] for seed in (0, 1)]
    text = _flat(HISTORY)
    assert f"ended at {tests[0]:.2f} and {tests[1]:.2f} test PPW" in text
    first_val = [
        float(
            (RESULTS / f"h200/search13/{run}/history.csv").read_text().splitlines()[1].split(",")[2]
        )
        for run in ("g50m-s0", "g55a-s0")
    ]
    assert f"(val {first_val[0]:.0f} after one epoch instead of {first_val[1]:.0f})" in text


def _table_after(marker: str) -> dict[str, list[str]]:
    """README's first table after ``marker``: each row's cells by its first cell."""
    lines = README[README.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2 :]:  # past the header and its rule
        if not line.startswith("|"):
            break
        first, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        rows[first] = cells
    return rows


def _bench_table(path: str) -> dict[tuple[str, str], list[str]]:
    """``bench/step_time.py``'s printed table: (cell, variant) -> median ms, x base, ...,
    the variant named as README names it."""
    names = {
        "torch.nn.{}": "torch.nn (cuDNN)",
        "Sloped{} FP loop": "FP reference loop",
        "Sloped{} ternary (TTQ w, BTQ a)": "ternary, eager",
        "Sloped{} ternary, compiled reduce-overhead": "ternary, compiled (reduce-overhead)",
        "Sloped{} ternary, compiled reduce-overhead + distillation": "ternary, compiled, distilled",
    }
    rows, cell = {}, ""
    for line in (RESULTS / path).read_text(encoding="utf-8").splitlines():
        if line.startswith("["):
            cell = line[1 : line.index("]")]
            continue
        for pattern, label in names.items():
            variant = pattern.format(cell.upper())
            if line.startswith(variant + " ") and line[len(variant) :].split()[0][0].isdigit():
                rows[cell, label] = line[len(variant) :].split()
    return rows


@pytest.mark.parametrize(
    ("marker", "path"),
    [
        ("(`results/h100/step_time.txt`)", "h100/step_time.txt"),
        ("(`results/h100/step_time_run2.txt`", "h100/step_time_run2.txt"),
    ],
)
def test_the_step_time_tables_are_the_benchs_tables(marker: str, path: str):
    bench = _bench_table(path)
    table = _table_after(marker)
    assert table
    for label, cells in table.items():
        median, _, ratio, _, mem_ratio = bench["lstm", label]
        gru_median, _, gru_ratio, _, gru_mem_ratio = bench["gru", label]
        assert cells == [median, ratio, gru_median, gru_ratio, f"{mem_ratio} / {gru_mem_ratio}"]


def test_the_stacked_runs_table_is_the_benchs_json():
    lines = README[README.index("| cell | runs | median step ms") :].splitlines()
    rows = [line for line in itertools.takewhile(lambda line: line.startswith("|"), lines)][2:]
    expected = []
    for cell in ("lstm", "gru"):
        report = json.loads((RESULTS / f"h200/multirun/{cell}.json").read_text())
        assert report["device"] == "NVIDIA H200" and report["distill"]
        for row in report["rows"]:
            runs = f"{row['runs']} " + ("(single)" if row["mode"] == "single" else row["mode"])
            expected.append(
                f"| {cell} | {runs} | {row['median_ms']:.2f} | {row['step_ratio']:.2f}x "
                f"| {row['epochs_per_min']:.2f} | {row['throughput_ratio']:.2f}x |"
            )
    assert rows == expected
    processes = json.loads((RESULTS / "h200/multirun/processes-gru.json").read_text())["rows"][-1]
    assert (processes["mode"], processes["runs"]) == ("processes", 6)
    assert f"gave {processes['throughput_ratio']:.2f}x (GRU" in _flat(README)


def test_the_sloped_step_figures_are_the_benchs_json():
    """The LSTM's slopes 2 / 2 step, in the search history (results/README.md)."""
    rows = {
        row["variant"]: row
        for row in _metrics("h100/step_time_lstm_slopes22.json")["results"]
        if row["cell"] == "lstm"
    }
    base = rows["torch.nn.LSTM"]
    compiled = rows["SlopedLSTM ternary, slopes 2/2, compiled reduce-overhead"]
    distilled = rows["SlopedLSTM ternary, slopes 2/2, compiled reduce-overhead + distillation"]
    assert (
        f"compiled {compiled['median_ms']:.2f} ms against cuDNN's {base['median_ms']:.2f} ms in"
        f" the same run ({compiled['ratio']:.2f}x), distilled {distilled['median_ms']:.2f} ms"
        f" ({distilled['ratio']:.2f}x), peak memory {compiled['mem_ratio']:.2f}x /"
        f" {distilled['mem_ratio']:.2f}x"
    ) in _flat(HISTORY)


def test_the_cpu_step_time_range_is_the_benchs_table():
    ratios = [
        float(line.split()[-1])
        for line in (RESULTS / "cpu_step_time.txt").read_text(encoding="utf-8").splitlines()
        if line.startswith(("torch.nn.", "Sloped"))
    ]
    assert f"within {min(ratios):.2f}-{max(ratios):.2f}x of torch's layer" in _flat(README)


def test_every_test_the_reliability_table_names_exists():
    section = README[README.index("## What survives what") : README.index("## The library")]
    named = re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)?)`", section)
    assert len(named) >= 10
    files = [REPO_ROOT / path for path, _ in named]
    for path, (_, test) in zip(files, named, strict=True):
        assert path.is_file(), path
        assert not test or f"def {test[2:]}(" in path.read_text(encoding="utf-8"), test
    for test in re.findall(r"`::(\w+)`", section):  # a test of the file named before it
        assert any(f"def {test}(" in path.read_text(encoding="utf-8") for path in files), test


def test_the_suites_duration_is_the_ci_runs_log():
    log = (RESULTS / "cpu_ci_run.txt").read_text(encoding="utf-8")
    summary = re.search(r"(\d+) passed, (\d+) xfailed.* in ([\d.]+)s", log)
    passed, xfailed, seconds = summary.groups()
    tests = int(passed) + int(xfailed)
    assert f"({float(seconds) / 60:.0f} min of pytest for {tests} tests" in _flat(README)
    (whole,) = re.findall(r"install included: (\d+) min", log)
    assert f"took {whole} min on a 2-core machine from a fresh clone" in _flat(README)
    (stack,) = re.findall(r"([\d.]+)s call +tests/stack/test_stack.py", log)
    assert f"({float(stack) / 60:.1f} min with cached image layers" in _flat(README)
    fast = (RESULTS / "cpu_fast_subset.txt").read_text(encoding="utf-8")
    passed, deselected, seconds = re.search(
        r"(\d+) passed, (\d+) deselected.* in ([\d.]+)s", fast
    ).groups()
    assert (
        f"leaves out the {deselected} slow tests ({passed} run, {float(seconds) / 60:.0f} min"
        in _flat(README)
    )
