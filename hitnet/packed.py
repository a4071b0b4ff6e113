"""A trained ternary language model as one file to deploy: 2-bit codes, scales, and the rest.

Layout (``save_packed`` / ``load_packed``): the safetensors layout, written by hand: an 8-byte
little-endian header length, a JSON header, then the raw little-endian tensors back to back.
Hand-written because it is 30 lines and adds no dependency, while any safetensors reader
(Python, Rust, C++; checked with safetensors 0.7.0) can still open the file without torch
and without unpickling anything (``torch.save`` would need both). The JSON header's
``__metadata__["hitnet"]`` is this format's own header: format name and version, the model's
``ModelConfig`` (sizes, cell, slopes, BTQ settings), the vocabulary's sha256, and which
tensors are packed.

Tensors:
  * every weight the model quantizes to ``scale * {-1, 0, 1}`` (the recurrent matrices under
    TTQ; the embedding and decoder too with ``ternary_embedding_decoder``) as ``<name>.codes``,
    2-bit codes 4 to a byte (``pack_codes``), and ``<name>.scale``, one float32 per matrix,
    or per row with ``ttq_per_row``;
  * every other parameter (biases, full-precision embedding and decoder) as float32, under
    its ``state_dict`` name; a tied decoder is stored once, as the embedding;
  * ``vocabulary``: the words in id order, UTF-8, one a line.

``load_packed`` rebuilds the model from the file alone. Its weights are the ternary values
themselves (codes times scale, bit for bit what the checkpoint's forward pass computes), so
the rebuilt model quantizes no weights again; its activations quantize as the trained one's.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hitnet.data import Vocabulary
from hitnet.language_model import ModelConfig, RNNLanguageModel, embedding_decoder_weight
from hitnet.quantizers import BTQEvalMode

FORMAT = "hitnet-packed"
VERSION = 1
CODES_PER_BYTE = 4
# 2-bit code -> ternary value; code 3 is unused (a corrupt file)
CODE_VALUES = (0, 1, -1)
DTYPES = {torch.float32: "F32", torch.uint8: "U8"}
VOCABULARY = "vocabulary"
TIED = "decoder.weight"  # with tie_weights, the embedding's tensor


class PackedModelError(ValueError):
    """A file is not a packed model this loader reads: truncated, corrupt or another version."""


def pack_codes(ternary: Tensor) -> Tensor:
    """Values in {-1, 0, 1}, any shape, as 2-bit codes 4 to a byte (row-major order; the
    first value in the lowest two bits; the last byte padded with code 0)."""
    flat = ternary.detach().reshape(-1)
    if not bool(((flat == 0) | (flat == 1) | (flat == -1)).all()):
        raise ValueError("pack_codes takes values in {-1, 0, 1} only")
    codes = (flat == 1).to(torch.uint8) + 2 * (flat == -1).to(torch.uint8)
    codes = torch.cat([codes, codes.new_zeros(-codes.numel() % CODES_PER_BYTE)])
    quads = codes.view(-1, CODES_PER_BYTE)
    return quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6


def unpack_codes(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``pack_codes``' inverse: int8 values in {-1, 0, 1} of ``shape``."""
    count = 1
    for size in shape:
        count *= size
    if packed.dtype != torch.uint8 or packed.numel() != -(-count // CODES_PER_BYTE):
        raise PackedModelError(
            f"{packed.numel()} bytes of {packed.dtype} cannot hold {count} 2-bit codes"
        )
    codes = torch.stack([packed >> shift & 3 for shift in (0, 2, 4, 6)], dim=-1).reshape(-1)
    codes = codes[:count].long()
    if bool((codes == 3).any()):
        raise PackedModelError("2-bit code 3 is not a ternary value: the file is corrupt")
    return torch.tensor(CODE_VALUES, dtype=torch.int8)[codes].reshape(shape)


def split_ternary(quantized: Tensor, per_row: bool) -> tuple[Tensor, Tensor] | None:
    """(codes, scale) with ``codes * scale == quantized`` exactly, or None when ``quantized``
    is not one scale (per row: one a row) times {-1, 0, 1}."""
    values = quantized.detach()
    scale = values.abs().amax(dim=-1, keepdim=True) if per_row else values.abs().amax()
    codes = torch.sign(values).to(torch.int8)
    if not torch.equal(codes * scale, values):
        return None
    return codes, scale.reshape(-1) if per_row else scale


def vocabulary_sha256(vocabulary: Vocabulary) -> str:
    """What the header names the vocabulary by: sha256 of its words, in id order, one a line."""
    return hashlib.sha256(_vocabulary_bytes(vocabulary)).hexdigest()


def _vocabulary_bytes(vocabulary: Vocabulary) -> bytes:
    return "\n".join(vocabulary.words).encode("utf-8")


def _quantized_weights(model: RNNLanguageModel) -> dict[str, Tensor]:
    """Every weight as the forward pass uses it, by parameter name (tied ones once)."""
    recurrent = model.recurrent
    with torch.no_grad():
        # named_parameters lists a tied tensor once
        weights = {name: param.detach() for name, param in model.named_parameters()}
        for name in list(weights):
            if name.startswith("recurrent.weight_"):
                weights[name] = recurrent.weight_quantizer(weights[name]).detach()
        for name in ("embedding.weight", "decoder.weight"):
            if name in weights:  # the model's own function, so the file holds what it computes
                weights[name] = embedding_decoder_weight(model.config, weights[name]).detach()
    return weights


def _ternary_by_config(config: ModelConfig, name: str) -> bool:
    if name.startswith("recurrent.weight_"):
        return config.quant.weight != "none"
    return config.ternary_embedding_decoder and name in ("embedding.weight", "decoder.weight")


def save_packed(model: RNNLanguageModel, vocabulary: Vocabulary, path: Path) -> None:
    """Writes ``model`` (with the ``vocabulary`` it was trained on) to ``path``, atomically.

    Every weight the model's config quantizes must come out of its quantizer as a scale times
    {-1, 0, 1} (TTQ does; 2-bit UQ does not): it is stored packed, anything else as float32.
    """
    config = model.config
    if len(vocabulary) != config.vocab_size:
        raise ValueError(
            f"the vocabulary has {len(vocabulary)} words, the model {config.vocab_size}"
        )
    tensors: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    for name, weight in _quantized_weights(model).items():
        if not _ternary_by_config(config, name):
            tensors[name] = weight.float()
            continue
        split = split_ternary(weight, config.quant.ttq_per_row)
        if split is None:
            raise ValueError(
                f"{name} is not ternary (quant.weight={config.quant.weight!r}): only "
                "TTQ weights pack into 2-bit codes"
            )
        codes, scale = split
        tensors[f"{name}.codes"] = pack_codes(codes)
        tensors[f"{name}.scale"] = scale.float()
        packed[name] = {"shape": list(weight.shape), "scale": "row" if scale.dim() else "matrix"}
    text = _vocabulary_bytes(vocabulary)
    tensors[VOCABULARY] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "vocabulary_sha256": hashlib.sha256(text).hexdigest(),
        "model": config.to_dict(),
        "packed": packed,
        "codes": "2 bits a value, 4 a byte, first value in the low bits: 0 -> 0, 1 -> +1, 2 -> -1",
    }
    _write_tensors(Path(path), tensors, {"hitnet": json.dumps(header, sort_keys=True)})


@dataclass(frozen=True)
class PackedModel:
    """What ``load_packed`` gives: the model, ready to evaluate, and what it was trained as."""

    model: RNNLanguageModel  # eval mode; weights already ternary (its config quantizes none)
    config: ModelConfig  # the trained model's config, as the file records it
    vocabulary: Vocabulary
    header: dict[str, Any]


def load_packed(path: Path, btq_eval: BTQEvalMode = "deterministic") -> PackedModel:
    """Rebuilds the model of a ``save_packed`` file; BTQ evaluates as ``btq_eval`` says
    (rounded by default: a deployed model scores a text the same way every time)."""
    path = Path(path)
    tensors, metadata = _read_tensors(path)
    header = _checked_header(path, metadata)
    config = ModelConfig.from_dict(header["model"]).evaluated_as(btq_eval)
    text = tensors.pop(VOCABULARY, torch.empty(0, dtype=torch.uint8)).numpy().tobytes()
    if hashlib.sha256(text).hexdigest() != header["vocabulary_sha256"]:
        raise PackedModelError(f"{path}: the vocabulary does not match its sha256: corrupt file")
    vocabulary = Vocabulary(text.decode("utf-8").split("\n"))

    # The stored weights are the quantized ones: quantizing them again is not the identity
    # in general (TTQ's threshold would see other magnitudes), so the rebuilt model does not.
    runnable = replace(
        config, quant=replace(config.quant, weight="none"), ternary_embedding_decoder=False
    )
    model = RNNLanguageModel(runnable)
    # torch's fused kernel only where the trained model used it too: the same arithmetic
    model.recurrent.fused_full_precision = config.quant.full_precision
    state = {}
    for name, info in header["packed"].items():
        codes = unpack_codes(_tensor(tensors, f"{name}.codes", path), tuple(info["shape"]))
        scale = _tensor(tensors, f"{name}.scale", path)
        state[name] = codes.float() * (scale.unsqueeze(-1) if info["scale"] == "row" else scale)
    state |= {
        name: value for name, value in tensors.items() if not name.endswith((".codes", ".scale"))
    }
    if config.tie_weights:
        state[TIED] = state["embedding.weight"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise PackedModelError(f"{path}: its tensors do not fit its model: {error}") from None
    return PackedModel(model.eval(), config, vocabulary, header)


def _tensor(tensors: dict[str, Tensor], name: str, path: Path) -> Tensor:
    if name not in tensors:
        raise PackedModelError(f"{path}: tensor {name} is missing")
    return tensors[name]


def _checked_header(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    try:
        header = json.loads(metadata["hitnet"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise PackedModelError(f"{path}: not a {FORMAT} file (no hitnet header)") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise PackedModelError(
            f"{path}: format {header.get('format')!r} version {header.get('version')!r}; "
            f"this loader reads {FORMAT!r} version {VERSION}"
        )
    return header


# --- the safetensors layout -----------------------------------------------------------


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    entries: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, tensor in tensors.items():
        blob = tensor.detach().cpu().contiguous().numpy().astype(_byte_order(tensor))
        data = blob.tobytes()
        entries[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the tensors start 8-byte aligned
    staged = path.with_name(f"{path.name}.partial")
    with staged.open("wb") as file:
        file.write(struct.pack("<Q", len(header)))
        file.write(header)
        for data in blobs:
            file.write(data)
    os.replace(staged, path)  # a reader never sees half a file


def _byte_order(tensor: Tensor) -> str:
    return {torch.float32: "<f4", torch.uint8: "u1"}[tensor.dtype]


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no packed model there")
    raw = path.read_bytes()
    try:
        (length,) = struct.unpack_from("<Q", raw)
        entries = json.loads(raw[8 : 8 + length])
        data = memoryview(raw)[8 + length :]
        metadata = entries.pop("__metadata__", {})
        tensors = {name: _decode(entry, data) for name, entry in entries.items()}
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise PackedModelError(f"{path}: not a {FORMAT} file ({error})") from None
    return tensors, metadata


def _decode(entry: dict[str, Any], data: memoryview) -> Tensor:
    dtype = {code: dtype for dtype, code in DTYPES.items()}[entry["dtype"]]
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    count = 1
    for size in shape:
        count *= size
    if not 0 <= begin <= end <= len(data) or end - begin != count * dtype.itemsize:
        raise PackedModelError(f"tensor data at {begin}:{end} does not fit shape {list(shape)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data[begin:end]), dtype=dtype).reshape(shape)


# --- sizes --------------------------------------------------------------------------


def file_sizes(path: Path) -> dict[str, Any]:
    """Bytes of a packed file, whole and by part, against the model's parameters in float32.

    Parts: ``recurrent_weights`` (codes and scales), ``recurrent_biases``, ``embedding``,
    ``decoder_weight``, ``decoder_bias``, ``vocabulary`` and ``header``. ``fp32_bytes`` of a
    part is 4 bytes a parameter (a tied decoder counted once, as in the file); ``rest``
    says what dominates the file besides the recurrent weights."""
    path = Path(path)
    raw = path.read_bytes()
    (length,) = struct.unpack_from("<Q", raw)
    entries = json.loads(raw[8 : 8 + length])
    header = _checked_header(path, entries.pop("__metadata__", {}))
    parts: dict[str, dict[str, int]] = {}

    def add(part: str, stored: int, fp32: int) -> None:
        bucket = parts.setdefault(part, {"bytes": 0, "fp32_bytes": 0})
        bucket["bytes"] += stored
        bucket["fp32_bytes"] += fp32

    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        base = name.removesuffix(".codes").removesuffix(".scale")
        if base in header["packed"]:  # the FP32 size of a packed matrix counts with its codes
            values = 1
            for size in header["packed"][base]["shape"]:
                values *= size
            fp32 = 4 * values if name.endswith(".codes") else 0
        else:
            fp32 = 0 if name == VOCABULARY else end - begin
        add(_part(base), end - begin, fp32)
    add("header", 8 + length, 0)
    stored = sum(part["bytes"] for part in parts.values())
    fp32 = sum(part["fp32_bytes"] for part in parts.values())
    recurrent = parts["recurrent_weights"]
    rest = sorted(
        (name for name in parts if name != "recurrent_weights"),
        key=lambda name: -parts[name]["bytes"],
    )
    return {
        "file_bytes": stored,
        "fp32_bytes": fp32,
        "ratio": round(fp32 / stored, 2),
        "recurrent_weights_ratio": round(recurrent["fp32_bytes"] / recurrent["bytes"], 2),
        # what the file is besides the recurrent weights, largest first: share of its bytes
        "rest": {name: round(parts[name]["bytes"] / stored, 4) for name in rest},
        "parts": parts,
    }


def _part(name: str) -> str:
    if name.startswith("recurrent.weight_"):
        return "recurrent_weights"
    if name.startswith("recurrent.bias_"):
        return "recurrent_biases"
    return {"embedding.weight": "embedding", VOCABULARY: VOCABULARY}.get(
        name, name.replace(".", "_")
    )
