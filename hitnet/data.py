"""Penn Treebank-format corpora for truncated-BPTT language modelling.

PTB-format text: one sentence a line, tokens separated by spaces; each line gets ``<eos>``.
The vocabulary comes from the training split; valid/test tokens outside it are an error
(PTB's vocabulary is closed) unless ``allow_unknown`` maps them to ``<unk>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

EOS = "<eos>"
UNK = "<unk>"
SPLIT_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}


class CorpusError(ValueError):
    """A corpus file is missing, empty, undecodable or holds an unknown token."""


class Vocabulary:
    """Word <-> index, in order of first appearance in the training split."""

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be distinct")

    @classmethod
    def from_sentences(cls, sentences: list[tuple[int, list[str]]]) -> Vocabulary:
        seen: dict[str, None] = {}
        for _, sentence in sentences:
            seen.update(dict.fromkeys(sentence))
        return cls(list(seen))

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index


def read_sentences(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tokens + ``<eos>``) of each non-blank line; clear errors on bad files."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: file not found (expected PTB-format text, one sentence a line)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of a word
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CorpusError(
            f"{path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
            f"{err.start})"
        ) from None
    # Split on "\n" only: str.splitlines would also break at form feeds and the like.
    sentences = [
        (number, [*line.split(), EOS])
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]
    if not sentences:
        raise CorpusError(f"{path}: file is empty (expected PTB-format text)")
    return sentences


def encode_sentences(
    sentences: list[tuple[int, list[str]]],
    vocab: Vocabulary,
    source: Path,
    allow_unknown: bool = False,
) -> Tensor:
    """One flat LongTensor of token ids; an out-of-vocabulary token names file, line, token."""
    unk_id = vocab.index.get(UNK)
    ids: list[int] = []
    for line_number, sentence in sentences:
        for token in sentence:
            token_id = vocab.index.get(token)
            if token_id is None:
                if not allow_unknown:
                    raise CorpusError(
                        f"{source}, line {line_number}: token {token!r} is not in the "
                        "training vocabulary (set allow_unknown to map it to <unk>)"
                    )
                if unk_id is None:
                    raise CorpusError(
                        f"{source}, line {line_number}: token {token!r} is unknown and the "
                        f"vocabulary has no {UNK} to map it to"
                    )
                token_id = unk_id
            ids.append(token_id)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Corpus:
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor

    def split(self, name: str) -> Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def load_corpus(data_dir: Path, allow_unknown: bool = False) -> Corpus:
    """Reads the three PTB files of ``data_dir``; the vocabulary is the training split's."""
    data_dir = Path(data_dir)
    paths = {split: data_dir / name for split, name in SPLIT_FILES.items()}
    sentences = {split: read_sentences(path) for split, path in paths.items()}
    vocab = Vocabulary.from_sentences(sentences["train"])
    encoded = {
        split: encode_sentences(sentences[split], vocab, paths[split], allow_unknown)
        for split in SPLIT_FILES
    }
    return Corpus(vocab=vocab, **encoded)


def batchify(tokens: Tensor, batch_size: int) -> Tensor:
    """Lays a token stream out as ``batch_size`` columns, dropping the remainder.

    a b c d e f g h i j k l, batch 4  ->  ┌ a d g j ┐
                                           │ b e h k │
                                           └ c f i l ┘
    Each column is read top to bottom, so the hidden state carries across windows.
    """
    rows = tokens.numel() // batch_size
    if rows < 2:
        raise CorpusError(
            f"{tokens.numel()} tokens cannot fill batch size {batch_size} with 2+ rows"
        )
    return tokens[: rows * batch_size].view(batch_size, rows).t().contiguous()


class BPTTWindows(Dataset):
    """Item i is one whole batch: (input, target) rows [i*bptt, i*bptt + bptt) of the layout."""

    def __init__(self, columns: Tensor, bptt: int) -> None:
        self.columns = columns
        self.bptt = bptt

    def __len__(self) -> int:
        return (self.columns.size(0) - 1 + self.bptt - 1) // self.bptt

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.bptt
        length = min(self.bptt, self.columns.size(0) - 1 - start)
        return (
            self.columns[start : start + length],
            self.columns[start + 1 : start + 1 + length],
        )


class PTBDataModule(pl.LightningDataModule):
    """PTB as unshuffled bptt windows: each batch continues the previous one's columns."""

    def __init__(
        self,
        data_dir: Path,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 35,
        allow_unknown: bool = False,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1 or bptt < 1:
            raise ValueError("batch_size, eval_batch_size and bptt must all be >= 1")
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 or None, got {max_tokens}")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bptt = bptt
        self.allow_unknown = allow_unknown
        self.max_tokens = max_tokens  # keep only the first N tokens of each split (smoke runs)
        self.corpus: Corpus | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = load_corpus(self.data_dir, self.allow_unknown)

    @property
    def vocab_size(self) -> int:
        self.setup()
        return len(self.corpus.vocab)

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        self.setup()
        tokens = self.corpus.split(split)[: self.max_tokens]
        if tokens.numel() // batch_size < 2:
            size = "batch_size" if split == "train" else "eval_batch_size"
            kept = "" if self.max_tokens is None else f" (max_tokens {self.max_tokens})"
            raise CorpusError(
                f"the {split} split has {tokens.numel()} tokens{kept}: too few to fill {size} "
                f"{batch_size} with 2+ rows; raise max_tokens or lower {size}"
            )
        windows = BPTTWindows(batchify(tokens, batch_size), self.bptt)
        # Its own generator: creating an iterator then draws no number from the global RNG,
        # which dropout and BTQ use; so a resumed run sees the same random stream.
        return DataLoader(windows, batch_size=None, shuffle=False, generator=torch.Generator())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
