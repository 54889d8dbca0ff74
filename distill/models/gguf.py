"""Read llama.cpp GGUF checkpoints (``llama`` and ``qwen2`` architectures) in Hugging Face terms.

A GGUF file is a key/value header, a tensor table and aligned tensor data. This module parses the
header itself, for the weights and for the tokenizer (`read_gguf_metadata`): loading a model reads
no vocabulary strings, and even decoding all of them is several times faster than
``gguf.GGUFReader`` (SmolLM2's 49,152 tokens and merges). It maps llama.cpp's metadata keys and tensor names to
the ones transformers gives the same file (``transformers/modeling_gguf_pytorch_utils.py`` and
``transformers/integrations/ggml.py``), and dequantizes one tensor at a time with
``gguf.quants.dequantize``, so the rest of distill converts a GGUF with the weight table it uses
for Hugging Face safetensors.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from distill.errors import DistillError

# general.architecture (also the HF model_type) -> HF architectures entry
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0}
    | {_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K}
)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# GGUF metadata value types: fixed-size scalars as struct codes; 8 is a string, 9 an array.
_SCALAR_CODES = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent


class _Tensor(NamedTuple):
    """One entry of the tensor table."""

    name: str  # llama.cpp name, e.g. "blk.3.attn_q.weight"
    shape: tuple[int, ...]  # PyTorch order: GGUF lists dimensions fastest-moving first
    ggml_type: int
    start: int  # absolute byte offset in the file
    nbytes: int


class _Header(NamedTuple):
    """A parsed GGUF file: metadata, tensor table, and the read-only byte map of the file."""

    path: Path
    metadata: dict[str, Any]  # string arrays (the vocabulary) are kept as their length only
    tensors: tuple[_Tensor, ...]
    data: np.memmap


def read_gguf_config(path) -> dict:
    """The Hugging Face ``config.json`` dict for a llama/qwen2 GGUF file, as transformers derives it.

    Reads only the header. ``rope_scaling`` is set when the file states one (transformers drops it).
    Raises ``DistillError`` for an unreadable file, another architecture or missing metadata.
    """
    return _config(_read_header(path))


def gguf_tensor_names(path) -> list[str]:
    """The Hugging Face names of the weights in a GGUF file, in file order, without reading data."""
    header = _read_header(path)
    _architecture(header)
    return [name for name in map(_hf_name, (t.name for t in header.tensors)) if name is not None]


def iter_gguf_tensors(path, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` one tensor at a time, dequantized, in Hugging Face layout.

    Linear weights are ``[out, in]``; llama's Q/K rows are un-permuted from llama.cpp's rotary
    order back to Hugging Face's half-split order. Each array is a plain ``dtype`` ndarray, never a view
    of the file. The whole file is checked (tensor types, required tensors) when this is called,
    before anything is yielded.
    """
    header = _read_header(path)
    config = _config(header)
    tensors = [(hf, t) for t in header.tensors if (hf := _hf_name(t.name)) is not None]
    _check_types(header, tensors)
    _check_complete(header, config, {hf for hf, _ in tensors})
    return _stream(header, config, tensors, np.dtype(dtype))


def _stream(header, config, tensors, dtype) -> Iterator[tuple[str, np.ndarray]]:
    for hf_name, tensor in tensors:
        values = _dequantize(header, tensor)
        if config["model_type"] == "llama" and ".q_proj." in hf_name:
            values = _unpermute(values, config["num_attention_heads"])
        elif config["model_type"] == "llama" and ".k_proj." in hf_name:
            values = _unpermute(values, config["num_key_value_heads"])
        values = np.asarray(values)  # a plain ndarray, not a memmap
        copy = np.may_share_memory(values, header.data)  # never hand out a view of the file
        yield hf_name, np.ascontiguousarray(values.astype(dtype, copy=copy))


def _dequantize(header: _Header, tensor: _Tensor) -> np.ndarray:
    """One tensor's values as float32, shaped ``tensor.shape``."""
    raw = header.data[tensor.start : tensor.start + tensor.nbytes]
    rows = raw.reshape(*tensor.shape[:-1], -1)  # [..., bytes per row]
    return dequantize(rows, GGMLQuantizationType(tensor.ggml_type)).reshape(tensor.shape)


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its ``permute`` in ``convert_hf_to_gguf.py``).

    llama.cpp interleaves each head's two rotary halves (rows ``h, 2, H/2`` -> ``h, H/2, 2``);
    this is transformers' ``_reverse_permute_weights``. Works on weights ``[N*H, D]`` and biases.
    """
    half = weights.shape[0] // n_head // 2
    grouped = weights.reshape(n_head, half, 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for one HF has no weight for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_MODULES:
        return None  # e.g. rope_freqs.weight: transformers ignores it too
    return f"model.layers.{match[1]}.{_LAYER_MODULES[match[2]]}.{match[3]}"


def _check_types(header: _Header, tensors: list[tuple[str, _Tensor]]) -> None:
    for _, tensor in tensors:
        if tensor.ggml_type not in SUPPORTED_TYPES:
            kind = _type_name(tensor.ggml_type)
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise DistillError(
                f"{header.path}: tensor {tensor.name} has quantization type {kind}, which distill "
                f"cannot dequantize (supported: {supported})"
            )


def _check_complete(header: _Header, config: dict, present: set[str]) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    per_layer = [f"{module}.weight" for module in _LAYER_MODULES.values()]
    if config["model_type"] == "qwen2":
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    for layer in range(config["num_hidden_layers"]):
        required += [f"model.layers.{layer}.{leaf}" for leaf in per_layer]
    missing = [name for name in required if name not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DistillError(f"{header.path}: GGUF file lacks tensor {missing[0]}{more}")


def _config(header: _Header) -> dict:
    """The HF config dict; the key mapping is transformers' ``GGUF_CONFIG_MAPPING``."""
    arch = _architecture(header)
    meta = header.metadata
    key = _metadata_getter(header, arch)
    names = {t.name for t in header.tensors}
    heads = key("attention.head_count")
    config = {
        "architectures": [_ARCHS[arch]],
        "model_type": arch,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": key("context_length"),
        "vocab_size": _vocab_size(header, arch),
        "hidden_act": "silu",
        # llama.cpp writes output.weight only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
    }
    if (head_dim := _head_dim(meta, arch)) is not None:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    for field in ("bos", "eos", "padding"):
        if (token := meta.get(f"tokenizer.ggml.{field}_token_id")) is not None:
            config[f"{field.replace('padding', 'pad')}_token_id"] = token
    if (rope_scaling := _rope_scaling(meta, arch)) is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _metadata_getter(header: _Header, arch: str):
    """``key(name, default)`` reading ``{arch}.{name}``; without a default, absence is an error."""
    missing = object()

    def key(name: str, default: Any = missing) -> Any:
        value = header.metadata.get(f"{arch}.{name}", default)
        if value is missing:
            raise DistillError(f"{header.path}: GGUF metadata lacks {arch}.{name}")
        return value

    return key


def _head_dim(meta: dict, arch: str) -> int | None:
    # transformers maps llama's rope.dimension_count to head_dim (it ignores it for qwen2, where
    # partial rotary would make it wrong); attention.key_length, when written, is head_dim itself.
    if (key_length := meta.get(f"{arch}.attention.key_length")) is not None:
        return key_length
    return meta.get(f"{arch}.rope.dimension_count") if arch == "llama" else None


def _vocab_size(header: _Header, arch: str) -> int:
    meta = header.metadata
    if (size := meta.get(f"{arch}.vocab_size")) is not None:
        return size
    if (tokens := meta.get("tokenizer.ggml.tokens")) is not None:
        return tokens  # kept as the array's length
    embed = [t for t in header.tensors if t.name == "token_embd.weight"]
    if not embed:
        raise DistillError(f"{header.path}: GGUF file states no vocabulary size")
    return embed[0].shape[0]


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    """HF ``rope_scaling`` from llama.cpp's ``rope.scaling.*`` (or legacy ``rope.scale_linear``)."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind is None and (factor := meta.get(f"{arch}.rope.scale_linear")) is not None:
        kind = "linear"
    if kind in (None, "none") or factor is None:
        return None
    scaling = {"rope_type": kind, "factor": float(factor)}
    if (original := meta.get(f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def _architecture(header: _Header) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in _ARCHS:
        raise DistillError(
            f"{header.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})"
        )
    return arch


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


# --- header parsing ---------------------------------------------------------------------------


class _Cursor:
    """Sequential little-endian reads over the file's bytes; overruns raise ``struct.error``."""

    def __init__(self, data: np.memmap, strings: tuple[str, ...] = ()):
        self.data, self.pos = data, 0
        self.strings = strings  # metadata keys whose string arrays are read (else skipped)

    def unpack(self, codes: str) -> tuple:
        values = struct.unpack_from("<" + codes, self.data, self.pos)
        self.pos += struct.calcsize("<" + codes)
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        raw = bytes(self.data[self.pos : self.pos + length])
        if len(raw) != length:
            raise struct.error("string runs past the end of the file")
        self.pos += length
        return raw.decode("utf-8")

    def value(self, kind: int, key: str = "") -> Any:
        if kind in _SCALAR_CODES:
            return self.unpack(_SCALAR_CODES[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise struct.error(f"unknown metadata value type {kind}")
        element, count = self.unpack("IQ")
        if element == _STRING and key.startswith(self.strings):
            return [self.string() for _ in range(count)]
        if element == _STRING:  # a vocabulary or merge table: skip it, keep its length
            for _ in range(count):
                (length,) = self.unpack("Q")
                self.pos += length
            return count
        if element not in _SCALAR_CODES:
            raise struct.error(f"unsupported metadata array of type {element}")
        dtype = np.dtype("<" + _SCALAR_CODES[element])
        values = np.frombuffer(self.data, dtype, count, self.pos).tolist()
        self.pos += dtype.itemsize * count
        return values


def read_gguf_metadata(path, prefixes: tuple[str, ...] = ("general.", "tokenizer.")) -> dict:
    """The metadata under `prefixes` with every value whole, string arrays (the vocabulary, the
    merges) included: what `distill.tokenizer.Tokenizer.from_gguf` rebuilds a tokenizer from."""
    header = _read_header(path, strings=prefixes)
    return {k: v for k, v in header.metadata.items() if k.startswith(prefixes)}


def _read_header(path, strings: tuple[str, ...] = ()) -> _Header:
    """Parse metadata and tensor table; every tensor must lie inside the file. String arrays are
    read for the metadata keys starting with `strings`, only counted for the others."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as error:
        raise DistillError(f"{path}: cannot read GGUF file ({error})") from error
    if bytes(data[:4]) != b"GGUF":
        raise DistillError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    try:
        cursor = _Cursor(data, strings)
        metadata, tensor_count = _read_metadata(cursor, path)
        table = [_read_tensor_info(cursor) for _ in range(tensor_count)]
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise DistillError(f"{path}: truncated or corrupt GGUF header ({error})") from error
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = tuple(_locate(path, entry, data_start, data.size) for entry in table)
    return _Header(path, metadata, tensors, data)


def _read_metadata(cursor: _Cursor, path: Path) -> tuple[dict, int]:
    _, version, tensor_count, kv_count = cursor.unpack("4sIQQ")
    if version not in (2, 3):
        raise DistillError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        (kind,) = cursor.unpack("I")
        metadata[key] = cursor.value(kind, key)
    return metadata, tensor_count


def _read_tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string()
    (n_dims,) = cursor.unpack("I")
    dims = cursor.unpack(f"{n_dims}Q")
    ggml_type, offset = cursor.unpack("IQ")
    return name, tuple(reversed(dims)), ggml_type, offset


def _locate(path: Path, entry: tuple, data_start: int, file_size: int) -> _Tensor:
    """Resolve a table entry to absolute bytes, checking it fits the file."""
    name, shape, ggml_type, offset = entry
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise DistillError(
            f"{path}: tensor {name} has {_type_name(ggml_type)}, which distill cannot read"
        ) from None
    if shape and shape[-1] % block:
        raise DistillError(f"{path}: tensor {name} rows of {shape[-1]} do not fill {block}-blocks")
    start = data_start + offset
    nbytes = math.prod(shape) // block * block_bytes
    if start + nbytes > file_size:
        raise DistillError(
            f"{path}: truncated GGUF file: tensor {name} ends at byte {start + nbytes} "
            f"but the file has {file_size} bytes"
        )
    return _Tensor(name, shape, ggml_type, start, nbytes)
