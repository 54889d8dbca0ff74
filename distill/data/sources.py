"""Tabular datasets read as streams of row batches: local Parquet, JSONL and JSONL.zst files (or
folders of them, searched recursively, as a hub snapshot lays them out), a folder written by
`datasets.Dataset.save_to_disk`, a `distill generate` run (checksums verified), or a Hugging Face
hub dataset name with its config and split.

A local folder laid out as a hub snapshot (`{config}/{split}-00000-of-00003.parquet`) is read at
its `config` and `split`, as the hub would serve them.

Rows arrive as plain dicts (nested lists and structs included), `batch_rows` at a time, and nothing
holds more than one batch: a source of a million rows streams in constant memory. The column names
are known before the first row (a JSONL source's are its first row's keys).

Hub datasets go through `datasets.load_dataset`, so its cache and offline switches apply
(`HF_HUB_OFFLINE=1` reads only the local cache); a hub that cannot be reached is one line saying
so. save_to_disk folders and hub datasets are Arrow files mapped from disk, read batch by batch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.store import MANIFEST, shard_paths
from distill.errors import DistillError

SOURCE_FORMATS = ("auto", "store", "parquet", "jsonl", "hf_disk", "hub")
_FILE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".zst": "jsonl"}
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class RowSource:
    """An opened dataset: where it is (for messages), its columns, and `batches()`, which reads it
    from the start each time it is called (lists of row dicts, each paired with its location)."""

    where: str
    format: str
    columns: tuple[str, ...]
    num_rows: int | None  # None when it is only known after reading (JSONL)
    _batches: Callable[[], Iterator[list[tuple[str, dict]]]]
    files: tuple[Path, ...] = ()  # the Parquet files of a parquet or store source
    inputs: tuple[Path, ...] = ()  # every local file it reads (what a cache of it depends on)

    def batches(self) -> Iterator[list[tuple[str, dict]]]:
        """(location, row) pairs, a batch at a time: `file:LINE` for JSONL, `file: row N` else."""
        return self._batches()

    def rows(self) -> Iterator[tuple[str, dict]]:
        for batch in self.batches():
            yield from batch


def open_source(source: str, *, format: str = "auto", config: str | None = None,
                split: str = "train", batch_rows: int = BATCH_ROWS) -> RowSource:
    """Open `source` (an absolute path, or a hub dataset name) for streaming. `config` and
    `split` choose a hub dataset's configuration and split (and a saved DatasetDict's split).
    An empty dataset, an unreadable file or an unreachable hub is a DistillError."""
    fmt = source_format(source, format)
    if fmt == "hub":
        return _arrow_source(load_hub(source, config, split), f"hub dataset {source!r}", fmt,
                             batch_rows)
    path = Path(source)
    if fmt == "hf_disk":
        return _arrow_source(load_disk(path, split), str(path), fmt, batch_rows)
    files = _files(path, fmt)
    if path.is_dir() and fmt != "store":
        files = _select(path, files, config, split)
    if fmt == "jsonl":
        return _jsonl_source(path, files, batch_rows)
    return _parquet_source(path, files, fmt, batch_rows)


def source_format(source: str, format: str = "auto") -> str:
    """The format `open_source` reads `source` as (an error names a source it cannot read)."""
    if format not in SOURCE_FORMATS:
        raise DistillError(f"unknown source format {format!r} (known: {', '.join(SOURCE_FORMATS)})")
    return _format(source, format)


def _format(source: str, fmt: str) -> str:
    if fmt != "auto":
        if fmt != "hub" and not os.path.exists(source):
            raise DistillError(f"{source}: no such file or folder")
        return fmt
    if not os.path.isabs(source):  # kept as a name by the config (distill.config.resolve_source)
        return "hub"
    path = Path(source)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return "store"
        if any((path / m).is_file() for m in HF_DISK_MARKERS):
            return "hf_disk"
        for suffix, found in (("*.parquet", "parquet"), ("*.jsonl", "jsonl"),
                              ("*.jsonl.zst", "jsonl")):
            if next(path.rglob(suffix), None) is not None:
                return found
        raise DistillError(f"{path}: no .parquet, .jsonl or .jsonl.zst files, no manifest.json "
                           "and not a save_to_disk folder")
    if path.is_file():
        found = _FILE_FORMATS.get(path.suffix.lower())
        if found is None or (path.suffix.lower() == ".zst" and not path.name.endswith(".jsonl.zst")):
            raise DistillError(f"{path}: cannot tell the format from the name (known: .parquet, "
                               ".jsonl, .jsonl.zst, a folder of them, a save_to_disk folder)")
        return found
    raise DistillError(f"{path}: no such file or folder")


def _files(path: Path, fmt: str) -> list[Path]:
    if fmt == "store":
        files = shard_paths(path)
        if not files:
            raise DistillError(f"{path}: the trace run holds no records (an empty dataset)")
        return files
    if path.is_file():
        return [path]
    patterns = ("*.parquet",) if fmt == "parquet" else ("*.jsonl", "*.jsonl.zst")
    files = sorted(f for p in patterns for f in path.rglob(p) if f.is_file())
    if not files:
        raise DistillError(f"{path}: no {' or '.join(patterns)} files (an empty dataset)")
    return files


_HUB_SHARD = re.compile(r"^(.+?)-\d{5}-of-\d{5}\.")  # {split}-00000-of-00010.parquet


def _split_name(f: Path) -> str | None:
    """The split a hub snapshot's file belongs to ({split}-NNNNN-of-NNNNN.*, {split}.*), or
    None for a name that says nothing."""
    m = _HUB_SHARD.match(f.name)
    if m:
        return m.group(1)
    stem = f.name.split(".", 1)[0]
    return stem if stem in ("train", "test", "validation", "valid", "dev") else None


def _select(path: Path, files: list[Path], config: str | None, split: str) -> list[Path]:
    """A local copy of a hub dataset laid out as the hub serves it (`{config}/{split}-*.parquet`;
    config "default" may live in `data/`): the files of that config and split. A folder whose
    files say no split is read whole."""
    if config is not None:
        sub = next((path / c for c in (config, "data" if config == "default" else None)
                    if c and (path / c).is_dir()), None)
        if sub is None:
            folders = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DistillError(f"{path}: no folder for config {config!r} (folders: "
                               f"{', '.join(folders) or 'none'})")
        files = [f for f in files if sub in f.parents]
    named = {f: _split_name(f) for f in files}
    splits = sorted({n for n in named.values() if n})
    if not splits:
        return files
    if split not in splits:
        raise DistillError(f"{path}: no split {split!r} (splits: {', '.join(splits)})")
    files = [f for f in files if named[f] == split]
    configs = sorted({f.relative_to(path).parts[0] for f in files
                      if len(f.relative_to(path).parts) > 1})
    if config is None and len(configs) > 1:
        raise DistillError(f"{path}: holds several configurations with a {split!r} split "
                           f"({', '.join(configs)}); set config")
    return files


# ---------------------------------------------------------------------------------------------
# Parquet and Arrow


def _parquet_source(path: Path, files: list[Path], fmt: str, batch_rows: int) -> RowSource:
    try:
        metas = [pq.read_metadata(f) for f in files]
        columns = tuple(pq.read_schema(files[0]).names)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DistillError(f"{path}: cannot read as parquet ({first_line(e)})") from None
    total = sum(m.num_rows for m in metas)
    if total == 0:
        raise DistillError(f"{path}: the dataset is empty (0 rows)")

    def batches():
        for f in files:
            row = 0
            try:
                # buffered, single-threaded reads: a row group is not held whole (a 200k-row
                # OpenR1-Math file peaks at 146 MiB instead of 338 with pyarrow's defaults)
                reader = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
                for batch in reader.iter_batches(batch_size=batch_rows, use_threads=False):
                    rows = batch.to_pylist()
                    yield [(f"{f}: row {row + i}", r) for i, r in enumerate(rows)]
                    row += len(rows)
            except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
                raise DistillError(f"{f}: cannot read parquet ({first_line(e)})") from None

    return RowSource(str(path), fmt, columns, total, batches, tuple(files), tuple(files))


def _arrow_source(ds, where: str, fmt: str, batch_rows: int) -> RowSource:
    if len(ds) == 0:
        raise DistillError(f"{where}: the dataset is empty (0 rows)")

    def batches():
        table = ds.with_format("arrow")
        for start in range(0, len(ds), batch_rows):
            rows = table[start:start + batch_rows].to_pylist()
            yield [(f"{where}: row {start + i}", r) for i, r in enumerate(rows)]

    inputs = tuple(Path(c["filename"]) for c in ds.cache_files)
    return RowSource(where, fmt, tuple(ds.column_names), len(ds), batches, inputs=inputs)


def load_disk(path: Path, split: str):
    """A dataset written by save_to_disk (a DatasetDict's `split`)."""
    import datasets  # here: ~1 s to import, and only hub and save_to_disk sources need it

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DistillError(f"{path}: cannot load the saved dataset ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DistillError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def load_hub(name: str, config: str | None, split: str):
    """A hub dataset's split, through `datasets` (its cache; HF_HUB_OFFLINE=1 reads only that)."""
    import datasets  # here: ~1 s to import, and only hub and save_to_disk sources need it

    what = f"hub dataset {name!r}" + (f" config {config!r}" if config else "") + f" split {split!r}"
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get(
            "HF_DATASETS_OFFLINE") == "1"
        hint = ("offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else
                "the hub cannot be reached or has no such dataset; with no network, set "
                "HF_HUB_OFFLINE=1 to use the local cache, or give a local path")
        raise DistillError(f"cannot load {what}: {hint} ({type(e).__name__}: "
                           f"{first_line(e)[:200]})") from None


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# JSONL (plain or zstd-compressed)


def _open_text(path: Path) -> io.BufferedReader:
    if path.name.endswith(".zst"):
        return io.BufferedReader(pa.input_stream(str(path), compression="zstd"))
    return open(path, "rb")


def _jsonl_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """(file:LINE, row) of every non-blank line; a line that is not a JSON object is an error."""
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DistillError(f"{where}: not a JSON line ({first_line(e)})") from None
                if not isinstance(row, dict):
                    raise DistillError(f"{where}: expected a JSON object, got "
                                       f"{type(row).__name__}")
                yield where, row
    except OSError as e:  # e.g. a corrupt zstd frame
        raise DistillError(f"{path}: cannot read ({first_line(e)})") from None


def _jsonl_source(path: Path, files: list[Path], batch_rows: int) -> RowSource:
    first = next((row for f in files for _, row in _jsonl_lines(f)), None)
    if first is None:
        raise DistillError(f"{path}: the dataset is empty (0 rows)")

    def batches():
        batch = []
        for f in files:
            for item in _jsonl_lines(f):
                batch.append(item)
                if len(batch) == batch_rows:
                    yield batch
                    batch = []
        if batch:
            yield batch

    return RowSource(str(path), "jsonl", tuple(first), None, batches, inputs=tuple(files))
