"""The trace dataset format of `distill generate` (teacher_traces/<run>/: manifest.json, README.md,
data/shard-NNNNN.parquet) and its reader: every shard's sha256 checked against the manifest.
The writer is `distill.traces.store.TraceStore`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.records import TRACE_SCHEMA
from distill.errors import DistillError

FORMAT = "distill-traces/1"
MANIFEST = "manifest.json"
DATA = "data"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DistillError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DistillError(f"{path}: not a distill trace manifest (format {FORMAT} expected)")
    return manifest


def read_manifest(run_dir: str | Path) -> dict:
    """The manifest of a trace run directory."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise DistillError(f"{run_dir}: no {MANIFEST}; not a trace directory written by "
                           "`distill generate`")
    return _read_manifest(path)


def shard_paths(run_dir: str | Path, verify: bool = True) -> list[Path]:
    """The run's shard files in order; with `verify`, each one's sha256 is checked against the
    manifest (a missing or altered shard is an error naming it)."""
    run_dir = Path(run_dir)
    paths = []
    for s in read_manifest(run_dir)["shards"]:
        if not s["file"]:
            continue
        path = run_dir / DATA / s["file"]
        if not path.is_file():
            raise DistillError(f"{path}: listed in the manifest but missing")
        if verify and sha256_file(path) != s["sha256"]:
            raise DistillError(f"{path}: checksum mismatch (the file changed after it was written)")
        paths.append(path)
    return paths


def column_filled(files, column: str) -> bool:
    """Whether the first of `files` (shards) with rows has values in `column`: older shards lack
    newer columns, and a run that could not fill one (no logprobs asked for) stores it null."""
    for path in files:
        if column not in pq.read_schema(path).names:
            return False
        values = pq.read_table(path, columns=[column]).column(0)
        if len(values):
            return values.null_count < len(values)
    return False


def read_table(run_dir: str | Path, verify: bool = True) -> pa.Table:
    """All records of a run as one Arrow table (checksums verified)."""
    paths = shard_paths(run_dir, verify)
    if not paths:
        return TRACE_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=TRACE_SCHEMA) for p in paths)


def iter_records(run_dir: str | Path, verify: bool = True) -> Iterator[dict]:
    """Every record of a run as a dict, shard by shard (checksums verified first)."""
    for path in shard_paths(run_dir, verify):
        yield from pq.read_table(path, schema=TRACE_SCHEMA).to_pylist()
