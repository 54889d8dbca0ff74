"""Streaming safetensors reading and writing, one tensor at a time.

Reading memory-maps the file and validates the header against the file size, so a truncated or
corrupt file is a one-line `DistillError` instead of a crash deep inside a copy. Writing takes the
tensor list up front (the header comes first) and pulls each tensor's data when its turn comes,
so a checkpoint never has to exist twice in host memory. Dtypes include bfloat16 and the FP8
formats through ml_dtypes.

Tensors are read whole (`SafetensorsFile.get`) or lazily, in parts (`iter_checkpoint` yields
`StoredTensor`s, `distill.models.lazy`): a process of a multi-host load reads only the slices its
devices hold. `READS` counts the bytes this process has taken from safetensors files.

Why not the `safetensors` package (measured with 0.8.0): `safe_open(..., framework="numpy")` (and
"flax") raises `AttributeError: module 'numpy' has no attribute 'float8_e4m3fn'` on F8_E4M3 tensors,
the format of DeepSeek-V3/R1's weights; and `safetensors.numpy.save_file` takes every tensor at
once: writing 16 tensors of 64 MiB peaked at 1,050 MiB RSS there, 161 MiB with `write_file`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from distill.errors import DistillError
from distill.fsutil import write_atomic
from distill.models.lazy import Index, LazyTensor, outer_take

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


class ReadCounter:
    """Bytes of tensor data this process has read from safetensors files (a whole tensor, or the
    parts a lazy read takes)."""

    def __init__(self):
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += int(n)


READS = ReadCounter()


class SafetensorsFile:
    """A memory-mapped .safetensors file: `names()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the mmap
        except OSError as e:
            raise DistillError(f"{self.path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise DistillError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > size - 8 or n > 100 * 2**20:
            raise DistillError(f"{self.path}: corrupt or truncated safetensors header")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DistillError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._base = 8 + n
        data_size = size - self._base
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if end > data_size:
                raise DistillError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {self._base + end} "
                    f"but the file has {size}")
            if e["dtype"] not in DTYPES:
                raise DistillError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of one tensor (copy it to keep it beyond the file's life)."""
        view = self._view(name)
        READS.add(view.nbytes)
        return view

    def read(self, name: str, index: Index | None = None) -> np.ndarray:
        """A copy of one tensor's values at the outer product of `index` (`distill.models.lazy`),
        the whole tensor when None; only that part of the file is read."""
        out = outer_take(self._view(name), index)
        READS.add(out.nbytes)
        return out

    def _view(self, name: str) -> np.ndarray:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        arr = np.frombuffer(self._mmap, DTYPES[e["dtype"]], (end - begin) // DTYPES[e["dtype"]].itemsize,
                            self._base + begin)
        return arr.reshape(e["shape"])

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the map goes with the last one
                pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The .safetensors files of a checkpoint directory (sharded via the index, or single)."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise DistillError(f"{index}: not a valid safetensors index (no weight_map)") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DistillError(f"{index}: shard {missing[0]} listed but missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DistillError(f"{directory}: no .safetensors weights found")
    return files


class StoredTensor(LazyTensor):
    """One tensor of an open safetensors file, read when (and where) asked for."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.shape, self.dtype = file.shape(name), file.dtype(name)

    def read(self, index: Index | None = None) -> np.ndarray:
        return self.file.read(self.name, index)


def iter_checkpoint(directory: str | Path) -> Iterator[tuple[str, StoredTensor]]:
    """(name, lazy tensor) for every tensor of every shard, in file order; nothing is read until
    a tensor is (each file stays open while its tensors are referenced)."""
    for path in checkpoint_files(directory):
        f = SafetensorsFile(path)
        for name in f.names():
            yield name, StoredTensor(f, name)


TensorSpec = tuple[str, tuple[int, ...], np.dtype]


def write_file(path: Path, specs: Sequence[TensorSpec], produce: Callable[[str], np.ndarray],
               metadata: dict | None = None) -> None:
    """Write one .safetensors file atomically; `produce(name)` returns each tensor in turn."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in specs:
                arr = np.ascontiguousarray(produce(name), dtype=dtype)
                if arr.shape != tuple(shape):
                    raise ValueError(f"{name}: produced shape {arr.shape}, planned {tuple(shape)}")
                f.write(arr.tobytes())

    write_atomic(path, write)


def write_checkpoint(directory: Path, specs: Sequence[TensorSpec], produce: Callable[[str], np.ndarray],
                     max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Write `model.safetensors`, or shards of at most ~max_shard_bytes plus the index file."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write_file(directory / name, shard, produce)
    if len(shards) > 1:
        total = sum(int(np.prod(s[1], dtype=np.int64)) * np.dtype(s[2]).itemsize for s in specs)
        index = {"metadata": {"total_size": total},
                 "weight_map": {s[0]: n for n, shard in zip(names, shards, strict=True) for s in shard}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]
