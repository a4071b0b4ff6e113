"""Stage `prepare`: PTB from a local folder or a download, checksum-verified, then tokenized.

Writes ``out_dir`` (ptb.{train,valid,test}.txt, vocab.txt, stats.json) all at once: the work
happens in a sibling temporary folder that replaces ``out_dir`` only when everything passed,
so a failed or corrupt download leaves no half-written output behind.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

from hitnet.data import SPLIT_FILES, CorpusError, load_corpus
from pipeline.cli import run_command
from pipeline.params import DataParams, load_params
from pipeline.tracking import stage_run

# sha256 of the three files of Mikolov's preprocessed PTB (../shared/data/ptb/README.md).
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
DOWNLOAD_TIMEOUT_S = 60


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(data: DataParams, name: str, dest: Path) -> None:
    """Copies ``name`` from ``data.source``, or downloads it from ``data.url``."""
    folder = data.source_dir()
    if folder is not None:
        source = folder / name
        if not source.is_file():
            raise CorpusError(f"data.source: {source} not found (expected PTB's {name} there)")
        shutil.copyfile(source, dest)
        return
    url = f"{data.url.rstrip('/')}/{name}"
    print(f"prepare: downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            dest.write_bytes(response.read())
    except (OSError, ValueError, http.client.HTTPException) as error:  # URLError is an OSError
        raise CorpusError(f"download of {name} from {url} failed: {error}") from None


def verify(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise CorpusError(
            f"{path.name}: sha256 {actual} does not match the expected {expected} "
            "(corrupt or not the PTB file; nothing was written)"
        )


def prepare(data: DataParams, out_dir: Path) -> dict[str, int]:
    """Fetches, verifies and tokenizes PTB into ``out_dir``; returns the split sizes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in SPLIT_FILES.values():
            fetch(data, name, staging / name)
            if data.verify_checksums:
                verify(staging / name, PTB_SHA256[name])
        try:
            corpus = load_corpus(staging, allow_unknown=data.allow_unknown)
        except CorpusError as error:  # name the file to fix, not its copy about to vanish
            origin = data.source if data.source is not None else data.url.rstrip("/")
            raise CorpusError(str(error).replace(str(staging), origin)) from None
        stats = {f"{split}_tokens": corpus.split(split).numel() for split in SPLIT_FILES}
        stats["vocab_size"] = len(corpus.vocab)
        (staging / "vocab.txt").write_text("\n".join(corpus.vocab.words) + "\n", encoding="utf-8")
        (staging / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/ptb"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    with stage_run(params.tracking, "prepare", {"data": params.data.model_dump()}) as run:
        stats = prepare(params.data, args.out)
        run.log_metrics(stats, step=0)
        run.log_artifact(args.out / "stats.json")
    print(f"prepare: wrote {args.out} {stats}", flush=True)


if __name__ == "__main__":
    run_command(main)
