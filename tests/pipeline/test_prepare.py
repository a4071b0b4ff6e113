"""pipeline/prepare.py: PTB from a folder or a download, checksum-verified, written at once."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from hitnet.data import SPLIT_FILES, CorpusError
from pipeline.params import DataParams
from pipeline.prepare import PTB_SHA256, main, prepare
from tests.conftest import REPO_ROOT

PTB_TOKENS = {"train_tokens": 929_589, "valid_tokens": 73_760, "test_tokens": 82_430}
PTB_STATS = {**PTB_TOKENS, "vocab_size": 10_000}
OUTPUT_FILES = {*SPLIT_FILES.values(), "vocab.txt", "stats.json"}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """(folder, url): a real HTTP server on 127.0.0.1 serving an initially empty folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    for name in ("no_proxy", "NO_PROXY"):  # urllib must not send 127.0.0.1 through a proxy
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    handler = functools.partial(QuietHandler, directory=str(folder))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served_ptb(ptb_dir: Path, server: tuple[Path, str]) -> tuple[Path, str]:
    """(folder, url): the server, serving a copy of PTB."""
    folder, url = server
    copy_ptb(ptb_dir, folder)
    return folder, url


def copy_ptb(ptb_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES.values():
        shutil.copyfile(ptb_dir / name, dest / name)
    return dest


def change_one_word(path: Path, old: str = " consumers ", new: str = " the ") -> None:
    """Replaces the first ``old`` with ``new`` (both in PTB's vocabulary): same token count."""
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (sha256(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def assert_complete_output(out: Path, stats: dict[str, int]) -> None:
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert stats == PTB_STATS
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == stats
    vocab = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 10_000
    assert len(set(vocab)) == 10_000
    assert "<eos>" in vocab
    assert "<unk>" in vocab


def assert_no_staging(parent: Path, *keep: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


def test_local_source(ptb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "ptb"
    stats = prepare(DataParams(source=str(ptb_dir)), out)
    assert_complete_output(out, stats)
    for name, digest in PTB_SHA256.items():
        assert sha256(out / name) == digest
    assert_no_staging(out.parent, "ptb")


def test_a_relative_source_is_found_from_the_project_root_dvc_names(
    ptb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc exp run --temp` runs a stage in a copy of the project; DVC_ROOT names the
    workspace, and a relative data.source is taken from there."""
    copy_ptb(ptb_dir, tmp_path / "corpus")
    workspace, copy = tmp_path / "workspace", tmp_path / "workspace/.dvc/tmp/exps/copy"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    stats = prepare(DataParams(source="../corpus"), copy / "data" / "ptb")
    assert_complete_output(copy / "data" / "ptb", stats)
    monkeypatch.delenv("DVC_ROOT")  # run by hand: from the working directory
    assert (
        DataParams(source="../corpus").source_dir().resolve() == (copy.parent / "corpus").resolve()
    )


def test_local_source_replaces_an_older_output(ptb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ptb"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run\n", encoding="utf-8")
    stats = prepare(DataParams(source=str(ptb_dir)), out)
    assert_complete_output(out, stats)
    assert_no_staging(tmp_path, "ptb")


def test_local_source_missing_file_names_the_path(ptb_dir: Path, tmp_path: Path) -> None:
    source = copy_ptb(ptb_dir, tmp_path / "source")
    (source / "ptb.test.txt").unlink()
    out = tmp_path / "data" / "ptb"
    with pytest.raises(CorpusError, match="not found") as caught:
        prepare(DataParams(source=str(source)), out)
    assert str(source / "ptb.test.txt") in str(caught.value)
    assert not out.exists()
    assert_no_staging(out.parent)


def test_download_accepts_good_files(tmp_path: Path, served_ptb: tuple[Path, str]) -> None:
    _, url = served_ptb
    out = tmp_path / "data" / "ptb"
    stats = prepare(DataParams(source=None, url=url), out)
    assert_complete_output(out, stats)
    assert_no_staging(out.parent, "ptb")


def test_download_accepts_url_with_trailing_slash(
    tmp_path: Path, served_ptb: tuple[Path, str]
) -> None:
    _, url = served_ptb
    stats = prepare(DataParams(source=None, url=f"{url}/"), tmp_path / "ptb")
    assert stats == PTB_STATS


def corrupt_valid(folder: Path) -> None:
    change_one_word(folder / "ptb.valid.txt")


def remove_test(folder: Path) -> None:
    (folder / "ptb.test.txt").unlink()  # the server answers 404


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        pytest.param(
            corrupt_valid,
            ["ptb.valid.txt", "sha256", "does not match", PTB_SHA256["ptb.valid.txt"]],
            id="corrupt-file",
        ),
        pytest.param(
            remove_test,
            ["ptb.test.txt", "download", "404", "{url}/ptb.test.txt"],
            id="missing-file",
        ),
    ],
)
def test_a_bad_download_is_named_and_leaves_nothing(
    tmp_path: Path,
    served_ptb: tuple[Path, str],
    spoil: Callable[[Path], None],
    expected: list[str],
) -> None:
    folder, url = served_ptb
    spoil(folder)
    out = tmp_path / "data" / "ptb"
    with pytest.raises(CorpusError) as caught:
        prepare(DataParams(source=None, url=url), out)
    message = str(caught.value)
    for words in expected:
        assert words.format(url=url) in message
    assert not out.exists()
    assert_no_staging(out.parent)


def test_failed_prepare_leaves_older_output_untouched(
    ptb_dir: Path, tmp_path: Path, served_ptb: tuple[Path, str]
) -> None:
    out = tmp_path / "data" / "ptb"
    prepare(DataParams(source=str(ptb_dir)), out)
    before = snapshot(out)
    folder, url = served_ptb
    change_one_word(folder / "ptb.test.txt")
    with pytest.raises(CorpusError, match=r"ptb\.test\.txt: sha256 .* does not match"):
        prepare(DataParams(source=None, url=url), out)
    assert snapshot(out) == before
    assert_no_staging(out.parent, "ptb")


def test_unreachable_server_is_a_corpus_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(CorpusError, match=r"download of ptb\.train\.txt .* failed"):
        prepare(DataParams(source=None, url=f"http://127.0.0.1:{port}"), tmp_path / "ptb")
    assert_no_staging(tmp_path)


def test_verify_checksums_off_accepts_a_modified_corpus(ptb_dir: Path, tmp_path: Path) -> None:
    source = copy_ptb(ptb_dir, tmp_path / "source")
    change_one_word(source / "ptb.valid.txt")
    out = tmp_path / "data" / "ptb"
    with pytest.raises(CorpusError, match="does not match"):
        prepare(DataParams(source=str(source)), out)
    stats = prepare(DataParams(source=str(source), verify_checksums=False), out)
    assert_complete_output(out, stats)
    assert (out / "ptb.valid.txt").read_bytes() == (source / "ptb.valid.txt").read_bytes()
    assert sha256(out / "ptb.valid.txt") != PTB_SHA256["ptb.valid.txt"]


@pytest.mark.slow
def test_main_writes_data_and_logs_an_mlflow_run(
    ptb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["source"] = str(ptb_dir)
    raw["tracking"]["experiment"] = "prepare-test"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.chdir(tmp_path)

    main([])  # defaults: --params params.yaml --out data/ptb

    out = tmp_path / "data" / "ptb"
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert_complete_output(out, stats)

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("prepare-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "prepare"
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.stage"] == "prepare"
    assert run.data.params["data.source"] == str(ptb_dir)
    assert run.data.params["data.verify_checksums"] == "true"
    assert run.data.metrics == {key: float(value) for key, value in PTB_STATS.items()}
    artifacts = [info.path for info in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["stats.json"]


def test_a_bad_source_file_is_named_where_it_lies_not_in_the_staging_copy(
    ptb_dir: Path, tmp_path: Path
) -> None:
    """Fault: the message named data/.ptb.<random>/ptb.test.txt, gone once prepare failed."""
    source = copy_ptb(ptb_dir, tmp_path / "source")
    change_one_word(source / "ptb.test.txt", " consumers ", " zyzzyvas ")  # not in the vocabulary
    out = tmp_path / "data" / "ptb"
    with pytest.raises(CorpusError) as caught:
        prepare(DataParams(source=str(source), verify_checksums=False), out)
    message = str(caught.value)
    assert f"{source}/ptb.test.txt" in message and ".ptb." not in message
    assert_no_staging(out.parent)
