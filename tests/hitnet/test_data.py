"""Unit tests of hitnet.data: PTB loading, batchify, BPTT windows and the data module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hitnet.data import (
    EOS,
    UNK,
    BPTTWindows,
    Corpus,
    CorpusError,
    PTBDataModule,
    batchify,
    load_corpus,
)


@pytest.fixture(scope="module")
def ptb(ptb_dir: Path) -> Corpus:
    return load_corpus(ptb_dir)


def write_corpus(directory: Path, train: str, valid: str, test: str) -> Path:
    """Writes the three PTB-format files into ``directory`` and returns it."""
    for name, text in (
        ("ptb.train.txt", train),
        ("ptb.valid.txt", valid),
        ("ptb.test.txt", test),
    ):
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def load_error(directory: Path, allow_unknown: bool = False) -> str:
    """The message of the CorpusError that loading ``directory`` raises."""
    with pytest.raises(CorpusError) as info:
        load_corpus(directory, allow_unknown=allow_unknown)
    return str(info.value)


def decode(corpus: Corpus, ids: torch.Tensor) -> list[str]:
    return [corpus.vocab.words[i] for i in ids.tolist()]


# --- the real Penn Treebank -------------------------------------------------------------


def test_ptb_split_sizes(ptb: Corpus) -> None:
    assert ptb.train.numel() == 929_589
    assert ptb.valid.numel() == 73_760
    assert ptb.test.numel() == 82_430
    for split in (ptb.train, ptb.valid, ptb.test):
        assert split.dtype == torch.long
        assert split.dim() == 1


def test_ptb_vocabulary(ptb: Corpus) -> None:
    assert len(ptb.vocab) == 10_000
    assert EOS in ptb.vocab
    assert UNK in ptb.vocab
    assert "definitely-not-a-ptb-word" not in ptb.vocab
    # ids index the vocabulary: every id of every split is in range
    for split in ("train", "valid", "test"):
        ids = ptb.split(split)
        assert int(ids.min()) >= 0
        assert int(ids.max()) < len(ptb.vocab)
    # the vocabulary is in order of first appearance in train, so train uses every word
    assert torch.unique(ptb.train).numel() == 10_000


def test_ptb_first_line_round_trips(ptb: Corpus, ptb_dir: Path) -> None:
    with (ptb_dir / "ptb.train.txt").open(encoding="utf-8") as f:
        first_line = f.readline().split()
    assert first_line[:2] == ["aer", "banknote"]
    expected = [*first_line, EOS]
    assert decode(ptb, ptb.train[: len(expected)]) == expected
    # first-appearance order: the first line's distinct words get ids 0, 1, 2, ...
    assert ptb.train[: len(expected)].tolist() == list(range(len(expected)))


def test_ptb_eos_count_matches_line_count(ptb: Corpus) -> None:
    eos_id = ptb.vocab.index[EOS]
    assert int((ptb.train == eos_id).sum()) == 42_068
    assert int((ptb.valid == eos_id).sum()) == 3_370
    assert int((ptb.test == eos_id).sum()) == 3_761


# --- batchify ---------------------------------------------------------------------------


def test_batchify_docstring_example() -> None:
    columns = batchify(torch.arange(12), 4)
    # a..l = 0..11: each column is a contiguous run of the stream, read top to bottom
    assert columns.tolist() == [
        [0, 3, 6, 9],
        [1, 4, 7, 10],
        [2, 5, 8, 11],
    ]
    assert columns.is_contiguous()


def test_batchify_drops_remainder() -> None:
    columns = batchify(torch.arange(14), 4)
    assert columns.shape == (3, 4)
    assert columns.tolist() == batchify(torch.arange(12), 4).tolist()
    assert 12 not in columns
    assert 13 not in columns


def test_batchify_columns_are_contiguous_runs() -> None:
    tokens = torch.arange(103)
    columns = batchify(tokens, 5)
    rows = 103 // 5
    assert columns.shape == (rows, 5)
    for c in range(5):
        assert torch.equal(columns[:, c], tokens[c * rows : (c + 1) * rows])


@pytest.mark.parametrize(("n_tokens", "batch_size"), [(7, 4), (4, 4), (0, 1), (1, 1)])
def test_batchify_too_few_tokens(n_tokens: int, batch_size: int) -> None:
    with pytest.raises(CorpusError, match=rf"{n_tokens} tokens .*batch size {batch_size}"):
        batchify(torch.arange(n_tokens), batch_size)


def test_batchify_two_rows_is_enough() -> None:
    assert batchify(torch.arange(8), 4).shape == (2, 4)


# --- BPTTWindows ------------------------------------------------------------------------


def test_bptt_windows_targets_shift_by_one() -> None:
    columns = batchify(torch.arange(60), 3)  # 20 rows
    windows = BPTTWindows(columns, bptt=6)
    for i in range(len(windows)):
        inputs, targets = windows[i]
        assert inputs.shape == targets.shape
        start = i * 6
        assert torch.equal(inputs, columns[start : start + inputs.size(0)])
        assert torch.equal(targets, columns[start + 1 : start + 1 + inputs.size(0)])
        # stream layout: each target is its input's successor in the token stream
        assert torch.equal(targets, inputs + 1)


def test_bptt_windows_last_window_shorter() -> None:
    columns = batchify(torch.arange(60), 3)  # 20 rows -> 19 input rows
    windows = BPTTWindows(columns, bptt=6)
    assert len(windows) == 4  # 6 + 6 + 6 + 1
    sizes = [windows[i][0].size(0) for i in range(len(windows))]
    assert sizes == [6, 6, 6, 1]


def test_bptt_windows_reproduce_rows() -> None:
    columns = batchify(torch.arange(100), 4)  # 25 rows
    windows = BPTTWindows(columns, bptt=7)
    inputs = torch.cat([windows[i][0] for i in range(len(windows))])
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    assert torch.equal(inputs, columns[:-1])
    assert torch.equal(targets, columns[1:])


@pytest.mark.parametrize(
    ("rows", "bptt", "expected"),
    [(2, 1, 1), (2, 35, 1), (11, 5, 2), (12, 5, 3), (36, 35, 1), (37, 35, 2), (10, 1, 9)],
)
def test_bptt_windows_len(rows: int, bptt: int, expected: int) -> None:
    columns = batchify(torch.arange(rows * 2), 2)
    assert columns.size(0) == rows
    windows = BPTTWindows(columns, bptt)
    assert len(windows) == expected
    # the windows cover exactly rows - 1 input rows
    assert sum(windows[i][0].size(0) for i in range(len(windows))) == rows - 1


def test_bptt_windows_index_out_of_range() -> None:
    windows = BPTTWindows(batchify(torch.arange(40), 2), bptt=5)  # 20 rows -> 4 windows
    assert len(windows) == 4
    windows[3]  # the last one is fine
    with pytest.raises(IndexError):
        windows[4]
    with pytest.raises(IndexError):
        windows[-1]
    # iteration stops at the end rather than yielding an empty window
    assert len(list(windows)) == 4


# --- error cases ------------------------------------------------------------------------


def test_missing_file_names_path(tmp_path: Path) -> None:
    write_corpus(tmp_path, "a b\n", "a\n", "b\n")
    (tmp_path / "ptb.test.txt").unlink()
    message = load_error(tmp_path)
    assert str(tmp_path / "ptb.test.txt") in message
    assert "not found" in message


def test_missing_directory_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CorpusError, match="not found") as info:
        load_corpus(missing)
    assert str(missing / "ptb.train.txt") in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_empty_file_names_path(tmp_path: Path, content: str) -> None:
    write_corpus(tmp_path, "a b\n", content, "a\n")
    message = load_error(tmp_path)
    assert str(tmp_path / "ptb.valid.txt") in message
    assert "empty" in message


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    write_corpus(tmp_path, "a b\n", "a\n", "b\n")
    bad = tmp_path / "ptb.train.txt"
    bad.write_bytes(b"a b\nb a\na \xff b\nb\n")
    message = load_error(tmp_path)
    assert str(bad) in message
    assert "line 3" in message
    assert "UTF-8" in message
    assert "0xff" in message


@pytest.mark.parametrize(
    ("valid", "test", "allow_unknown", "named_file", "remedy"),
    [
        pytest.param(
            "the cat\nthe zebra sat\n", "the\n", False, "ptb.valid.txt", "allow_unknown", id="off"
        ),
        # allowed, but the vocabulary has no <unk> to map it to
        pytest.param("the cat\n", "the\nsat zebra\n", True, "ptb.test.txt", UNK, id="no-unk"),
    ],
)
def test_unknown_token_names_file_line_token_and_remedy(
    tmp_path: Path, valid: str, test: str, allow_unknown: bool, named_file: str, remedy: str
) -> None:
    write_corpus(tmp_path, "the cat sat\n", valid, test)
    message = load_error(tmp_path, allow_unknown)
    assert str(tmp_path / named_file) in message
    assert "line 2" in message
    assert "'zebra'" in message
    assert remedy in message


def test_allow_unknown_maps_to_unk(tmp_path: Path) -> None:
    write_corpus(tmp_path, "the <unk> sat\n", "the cat\nthe zebra sat\n", "the\n")
    corpus = load_corpus(tmp_path, allow_unknown=True)
    assert corpus.vocab.words == ["the", UNK, "sat", EOS]
    assert decode(corpus, corpus.valid) == ["the", UNK, EOS, "the", UNK, "sat", EOS]
    # unknown words never enter the vocabulary
    assert "zebra" not in corpus.vocab
    assert "cat" not in corpus.vocab


def test_allow_unknown_off_by_default_even_with_unk(tmp_path: Path) -> None:
    write_corpus(tmp_path, "the <unk> sat\n", "the zebra\n", "the\n")
    with pytest.raises(CorpusError, match="'zebra'"):
        load_corpus(tmp_path)


def test_vocabulary_comes_from_train_only(tmp_path: Path) -> None:
    write_corpus(tmp_path, "b a\nc a\n", "a b\n", "c\n")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab.words == ["b", "a", EOS, "c"]
    assert corpus.train.tolist() == [0, 1, 2, 3, 1, 2]
    assert corpus.valid.tolist() == [1, 0, 2]
    assert corpus.test.tolist() == [3, 2]


# --- PTBDataModule ----------------------------------------------------------------------


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    words = [f"w{i}" for i in range(10)]
    # train: 30 lines of 9 words + <eos> = 300 tokens; valid/test: 20 lines = 200 tokens
    train = "".join(" ".join(words[(i + j) % 10] for j in range(9)) + "\n" for i in range(30))
    valid = "".join(" ".join(words[(i * 3 + j) % 10] for j in range(9)) + "\n" for i in range(20))
    test = "".join(" ".join(words[(i * 7 + j) % 10] for j in range(9)) + "\n" for i in range(20))
    return write_corpus(tmp_path, train, valid, test)


def test_datamodule_train_batches(small_corpus: Path) -> None:
    dm = PTBDataModule(small_corpus, batch_size=4, eval_batch_size=3, bptt=7)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    # 300 tokens / 4 columns = 75 rows -> 74 input rows -> 10 windows of 7 and one of 4
    assert len(batches) == 11
    for inputs, targets in batches[:-1]:
        assert inputs.shape == (7, 4)
        assert targets.shape == (7, 4)
        assert inputs.dtype == torch.long
    assert batches[-1][0].shape == (4, 4)
    assert batches[-1][1].shape == (4, 4)
    # batches are unshuffled and continue each other's columns
    columns = batchify(dm.corpus.train, 4)
    assert torch.equal(torch.cat([x for x, _ in batches]), columns[:-1])
    assert torch.equal(torch.cat([y for _, y in batches]), columns[1:])


@pytest.mark.parametrize("loader", ["val_dataloader", "test_dataloader"])
def test_datamodule_eval_batch_size(small_corpus: Path, loader: str) -> None:
    dm = PTBDataModule(small_corpus, batch_size=4, eval_batch_size=3, bptt=7)
    batches = list(getattr(dm, loader)())
    # 200 tokens / 3 columns = 66 rows -> 65 input rows -> 9 windows of 7 and one of 2
    assert len(batches) == 10
    assert all(x.shape == (7, 3) for x, _ in batches[:-1])
    assert batches[-1][0].shape == (2, 3)
    split = dm.corpus.valid if loader == "val_dataloader" else dm.corpus.test
    assert torch.equal(torch.cat([x for x, _ in batches]), batchify(split, 3)[:-1])


def test_datamodule_max_tokens(small_corpus: Path) -> None:
    dm = PTBDataModule(small_corpus, batch_size=4, eval_batch_size=2, bptt=5, max_tokens=40)
    train = list(dm.train_dataloader())
    # 40 tokens / 4 columns = 10 rows -> 9 input rows -> windows of 5 and 4
    assert [x.shape for x, _ in train] == [(5, 4), (4, 4)]
    assert torch.equal(torch.cat([x for x, _ in train]), batchify(dm.corpus.train[:40], 4)[:-1])
    valid = list(dm.val_dataloader())
    # 40 tokens / 2 columns = 20 rows -> 19 input rows -> 3 windows of 5 and one of 4
    assert [x.shape for x, _ in valid] == [(5, 2)] * 3 + [(4, 2)]
    # the corpus itself is not truncated
    assert dm.corpus.train.numel() == 300


def test_datamodule_max_tokens_too_small_names_the_split_and_what_to_change(
    small_corpus: Path,
) -> None:
    dm = PTBDataModule(small_corpus, batch_size=4, eval_batch_size=10, max_tokens=7)
    with pytest.raises(CorpusError) as caught:
        dm.train_dataloader()
    assert str(caught.value) == (
        "the train split has 7 tokens (max_tokens 7): too few to fill batch_size 4 with 2+ "
        "rows; raise max_tokens or lower batch_size"
    )
    with pytest.raises(CorpusError, match=r"the valid split has 7 tokens .* eval_batch_size 10"):
        dm.val_dataloader()


def test_datamodule_vocab_size(small_corpus: Path) -> None:
    dm = PTBDataModule(small_corpus)
    assert dm.corpus is None
    assert dm.vocab_size == 11  # w0..w9 and <eos>
    assert dm.corpus is not None  # vocab_size loads the corpus on demand


def test_datamodule_setup_loads_once(small_corpus: Path) -> None:
    dm = PTBDataModule(small_corpus)
    dm.setup("fit")
    corpus = dm.corpus
    dm.setup("validate")
    dm.val_dataloader()
    assert dm.corpus is corpus


def test_datamodule_allow_unknown(tmp_path: Path) -> None:
    write_corpus(tmp_path, "a <unk> b\na b\n", "a zebra\n", "b\n")
    with pytest.raises(CorpusError, match="zebra"):
        PTBDataModule(tmp_path, batch_size=2, eval_batch_size=1).setup()
    dm = PTBDataModule(tmp_path, batch_size=2, eval_batch_size=1, allow_unknown=True)
    dm.setup()
    assert decode(dm.corpus, dm.corpus.valid) == ["a", UNK, EOS]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": -3},
        {"eval_batch_size": 0},
        {"bptt": 0},
    ],
)
def test_datamodule_invalid_sizes(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        PTBDataModule(tmp_path, **kwargs)


def test_datamodule_on_real_ptb(ptb_dir: Path, ptb: Corpus) -> None:
    dm = PTBDataModule(ptb_dir, batch_size=20, eval_batch_size=10, bptt=35, max_tokens=10_000)
    dm.corpus = ptb  # reuse the module's corpus rather than reading PTB again
    assert dm.vocab_size == 10_000
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == (35, 20)
    assert torch.equal(inputs[1:], targets[:-1])
    # the first column starts with the first tokens of ptb.train.txt
    assert torch.equal(inputs[:, 0], ptb.train[:35])
    assert len(dm.train_dataloader()) == (10_000 // 20 - 1 + 34) // 35


def test_unknown_token_line_number_counts_blank_lines(tmp_path: Path) -> None:
    write_corpus(tmp_path, "a b\n", "a\n\n\nb zebra\n", "a\n")
    with pytest.raises(CorpusError, match="line 4: token 'zebra'"):
        load_corpus(tmp_path)


def test_only_newlines_end_sentences(tmp_path: Path) -> None:
    write_corpus(tmp_path, "a\x0cb c\n", "a zebra\n", "a\n")
    with pytest.raises(CorpusError, match="line 1: token 'zebra'"):
        load_corpus(tmp_path)
    write_corpus(tmp_path, "a\x0cb c\n", "a b\n", "a\n")
    assert load_corpus(tmp_path).train.numel() == 4  # 'a\x0cb' splits into two words, + <eos>


def test_leading_byte_order_mark_is_not_part_of_a_word(tmp_path: Path) -> None:
    write_corpus(tmp_path, "a b\n", "a\n", "b\n")
    (tmp_path / "ptb.train.txt").write_bytes(b"\xef\xbb\xbfa b\n")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab.words == ["a", "b", EOS]


@pytest.mark.parametrize("max_tokens", [-3, 0, 1])
def test_datamodule_rejects_max_tokens_below_two(small_corpus: Path, max_tokens: int) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        PTBDataModule(small_corpus, max_tokens=max_tokens)
