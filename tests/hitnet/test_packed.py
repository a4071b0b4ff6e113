"""The packed file: 2-bit codes round trip, the rebuilt model computes what the trained one
does, sizes, and clear errors for files it cannot read."""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hitnet.data import Vocabulary
from hitnet.language_model import ModelConfig, RNNLanguageModel
from hitnet.packed import (
    PackedModelError,
    file_sizes,
    load_packed,
    pack_codes,
    save_packed,
    split_ternary,
    unpack_codes,
    vocabulary_sha256,
)
from hitnet.quantizers import QuantConfig, quantize_uniform, ternarize_threshold

VOCAB = 37
TERNARY = QuantConfig(weight="ttq", activation="btq", btq_eval="deterministic", ttq_threshold=0.5)
SMALL = ModelConfig(
    vocab_size=VOCAB, embedding_size=8, hidden_size=12, quant=TERNARY, lambda_sigma=2.0
)
shapes = st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple)


def _vocabulary(size: int = VOCAB) -> Vocabulary:
    return Vocabulary(["<eos>", "the", "naïve", *(f"w{i}" for i in range(size - 3))])


def _model(config: ModelConfig, seed: int = 0) -> RNNLanguageModel:
    torch.manual_seed(seed)
    return RNNLanguageModel(config).eval()


@settings(max_examples=80, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_codes_round_trip_four_to_a_byte(shape, seed):
    values = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(values)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-values.numel() // 4)
    unpacked = unpack_codes(packed, shape)
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, values.to(torch.int8))


def test_codes_fill_each_byte_from_its_low_bits():
    # 1 -> 0b01, -1 -> 0b10, 0 -> 0b00; the fifth value starts a byte of its own
    packed = pack_codes(torch.tensor([1, -1, 0, 1, -1]))
    assert packed.tolist() == [0b01_00_10_01, 0b10]


def test_codes_refuse_what_is_not_ternary():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_codes(torch.tensor([0.5, 1.0]))
    with pytest.raises(PackedModelError, match="code 3"):
        unpack_codes(torch.tensor([0b11], dtype=torch.uint8), (1,))
    with pytest.raises(PackedModelError, match="cannot hold 9"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), (9,))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 20),
    cols=st.integers(1, 20),
    threshold=st.floats(0.0, 3.0),
    scaled=st.booleans(),
    per_row=st.booleans(),
)
def test_a_ttq_matrix_splits_into_codes_and_scales_exactly(
    seed, rows, cols, threshold, scaled, per_row
):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    quantized = ternarize_threshold(weight, threshold, scaled, per_row)
    codes, scale = split_ternary(quantized, per_row)
    assert scale.shape == ((rows,) if per_row else ())
    expanded = scale.unsqueeze(-1) if per_row else scale
    assert torch.equal(codes.float() * expanded, quantized)  # bit for bit, not approximately


def test_two_bit_uniform_weights_are_not_ternary():
    weight = torch.linspace(-1, 1, 12).reshape(3, 4)
    assert split_ternary(quantize_uniform(weight, 2), per_row=False) is None


CONFIGS = {
    "lstm": SMALL,
    "gru": replace(SMALL, cell="gru", lambda_tanh=1.5),
    "gru accumulator": replace(SMALL, cell="gru", quant=replace(TERNARY, gru_accumulator=True)),
    "per-row scales": replace(SMALL, quant=replace(TERNARY, ttq_per_row=True)),
    "unscaled": replace(SMALL, quant=replace(TERNARY, ttq_scaled=False)),
    "two layers": replace(SMALL, num_layers=2),
    "ternary embedding and decoder": replace(SMALL, ternary_embedding_decoder=True),
    "tied": replace(SMALL, embedding_size=12, tie_weights=True, ternary_embedding_decoder=True),
    # slopes 1: the one config whose rebuilt model could take torch's fused kernel
    "ternary weights, FP activations": replace(
        SMALL, lambda_sigma=1.0, quant=replace(TERNARY, activation="none")
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_rebuilt_model_computes_exactly_what_the_trained_one_does(tmp_path: Path, name: str):
    """Rounded BTQ: equal logits and states, not merely close. The file holds each weight's
    ternary values bit for bit, and the rebuilt model runs the same float32 operations on
    them in the same order, so nothing may differ."""
    config = CONFIGS[name]
    trained = _model(config)
    save_packed(trained, _vocabulary(), tmp_path / "model.hitnet")
    loaded = load_packed(tmp_path / "model.hitnet")
    assert loaded.config == config
    tokens = torch.randint(0, VOCAB, (9, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_state = trained(tokens[:5])
        got, state = loaded.model(tokens[:5])
        assert torch.equal(got, expected)
        expected, _ = trained(tokens[5:], expected_state)  # the state carries across windows
        got, _ = loaded.model(tokens[5:], state)
    assert torch.equal(got, expected)


def test_drawn_btq_draws_the_same_levels_from_the_same_generator(tmp_path: Path):
    trained = _model(replace(SMALL, quant=replace(TERNARY, btq_eval="stochastic")))
    save_packed(trained, _vocabulary(), tmp_path / "model.hitnet")
    loaded = load_packed(tmp_path / "model.hitnet", btq_eval="stochastic")
    tokens = torch.randint(0, VOCAB, (6, 2))
    with torch.no_grad():
        expected, _ = trained(tokens, generator=torch.Generator().manual_seed(3))
        got, _ = loaded.model(tokens, generator=torch.Generator().manual_seed(3))
        rounded, _ = load_packed(tmp_path / "model.hitnet").model(tokens)
    assert torch.equal(got, expected) and not torch.equal(got, rounded)


def test_the_header_names_version_vocabulary_and_packed_weights(tmp_path: Path):
    vocabulary = _vocabulary()
    save_packed(_model(SMALL), vocabulary, tmp_path / "model.hitnet")
    loaded = load_packed(tmp_path / "model.hitnet")
    assert loaded.vocabulary.words == vocabulary.words
    header = loaded.header
    assert header["format"] == "hitnet-packed" and header["version"] == 1
    assert header["vocabulary_sha256"] == vocabulary_sha256(vocabulary)
    assert sorted(header["packed"]) == [f"recurrent.weight_{k}_l0" for k in ("hh", "ih")]
    assert header["packed"]["recurrent.weight_ih_l0"] == {"shape": [48, 8], "scale": "matrix"}
    assert header["model"]["lambda_sigma"] == 2.0 and header["model"]["quant"]["activation"]


def test_sizes_count_two_bits_a_recurrent_weight(tmp_path: Path):
    path = tmp_path / "model.hitnet"
    save_packed(_model(SMALL), _vocabulary(), path)
    sizes = file_sizes(path)
    assert sizes["file_bytes"] == path.stat().st_size
    recurrent = sizes["parts"]["recurrent_weights"]
    values = 4 * 12 * (8 + 12)  # W_ih 48x8, W_hh 48x12
    assert recurrent == {"bytes": values // 4 + 2 * 4, "fp32_bytes": 4 * values}
    assert sizes["parts"]["embedding"] == {"bytes": 4 * VOCAB * 8, "fp32_bytes": 4 * VOCAB * 8}
    assert sizes["fp32_bytes"] == 4 * sum(p.numel() for p in _model(SMALL).parameters())
    assert next(iter(sizes["rest"])) == "decoder_weight"  # 12 x 37 floats beat 37 x 8
    assert "recurrent_weights" not in sizes["rest"]


def test_a_full_size_recurrent_layer_is_sixteen_times_smaller(tmp_path: Path):
    config = ModelConfig(vocab_size=200, quant=TERNARY)  # 1x300, as the paper's
    path = tmp_path / "model.hitnet"
    save_packed(_model(config), _vocabulary(200), path)
    assert file_sizes(path)["recurrent_weights_ratio"] == 16.0  # 2 880 000 / 180 008 bytes


def test_only_ternary_weights_pack(tmp_path: Path):
    uniform = replace(SMALL, quant=replace(TERNARY, weight="uq"))
    with pytest.raises(ValueError, match=r"recurrent\.weight_ih_l0 is not ternary"):
        save_packed(_model(uniform), _vocabulary(), tmp_path / "model.hitnet")
    with pytest.raises(ValueError, match="vocabulary has 36 words, the model 37"):
        save_packed(_model(SMALL), _vocabulary(36), tmp_path / "model.hitnet")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    entries = json.loads(raw[8 : 8 + length])
    header = json.loads(entries["__metadata__"]["hitnet"])
    change(header)
    entries["__metadata__"]["hitnet"] = json.dumps(header)
    text = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def test_a_file_it_cannot_read_is_one_clear_error(tmp_path: Path):
    path = tmp_path / "model.hitnet"
    save_packed(_model(SMALL), _vocabulary(), path)
    good = path.read_bytes()

    path.write_bytes(good[:-3])  # truncated: the vocabulary's bytes run short
    with pytest.raises(PackedModelError, match="does not fit shape"):
        load_packed(path)
    path.write_bytes(good[:-1] + b"X")  # one word changed
    with pytest.raises(PackedModelError, match="vocabulary does not match its sha256"):
        load_packed(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(PackedModelError, match="not a hitnet-packed file"):
        load_packed(path)
    path.write_bytes(good)
    _rewrite_header(path, lambda header: header.update(version=2))
    with pytest.raises(PackedModelError, match=r"version 2; this loader reads .* version 1"):
        load_packed(path)
    with pytest.raises(FileNotFoundError, match="no packed model there"):
        load_packed(tmp_path / "missing.hitnet")
