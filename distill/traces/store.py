"""The trace store's writer: Parquet shards under teacher_traces/<run>/data/, a manifest, a dataset
card (the format and its reader: `distill.data.store`).

Crash safety: each shard is written to a temporary file, fsynced and renamed into place; only then
is the manifest rewritten (atomically too) to list it with its record count and sha256. A shard file
the manifest does not list is left over from a crash and is deleted when the run resumes. Shard k
always covers the same prompts (the run's prompts in order, `prompts_per_shard` at a time), so the
manifest's shard list is the whole resume state: a listed shard is never generated again.

Layout:
    teacher_traces/<run>/manifest.json        shards, teacher, sampling, filters, counts, tokens
    teacher_traces/<run>/README.md            dataset card
    teacher_traces/<run>/data/shard-00000.parquet
"""

from __future__ import annotations

import datetime
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.records import TRACE_SCHEMA
from distill.data.store import DATA, FORMAT, MANIFEST, read_manifest, sha256_file
from distill.errors import DistillError
from distill.fsutil import FREE, write_atomic, writing


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like trees, as 'key (old -> new)'."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old!r} -> {new!r})"]


class TraceStore:
    """One run directory: open (new, resumed or overwritten), add shards, finish."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | Path, run_config: dict, *, overwrite: bool = False) -> TraceStore:
        """Open `root` for writing. `run_config` is the resolved, secret-free configuration that
        determines the traces; resuming with a different one is an error naming the changed keys."""
        root = Path(root)
        if overwrite and root.exists():
            shutil.rmtree(root)
        path = root / MANIFEST
        if path.is_file():
            manifest = read_manifest(root)
            changed = config_diff(manifest.get("config"), run_config)
            if changed:
                raise DistillError(
                    f"{root}: the config changed since this run started: {'; '.join(changed)}. "
                    "Rerun with --overwrite to start over, or restore the config to resume")
        elif root.exists() and any(root.iterdir()):
            raise DistillError(f"{root}: exists but has no {MANIFEST}; not a trace run directory "
                               "(remove it or pass --overwrite)")
        else:
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            manifest = {"format": FORMAT, "created": now, "complete": False,
                        "config": run_config, "shards": []}
        store = cls(root, manifest)
        with writing(root, store.safe):
            store._remove_unlisted()
            store._write_manifest()
        return store

    def _remove_unlisted(self) -> None:
        """Delete shard files a crash left behind before the manifest listed them."""
        data = self.root / DATA
        data.mkdir(parents=True, exist_ok=True)
        listed = {s["file"] for s in self.manifest["shards"] if s["file"]}
        for f in data.iterdir():
            if f.name not in listed:
                f.unlink()

    # ------------------------------------------------------------------ writing

    def done(self) -> set[int]:
        """Indices of the shards already stored."""
        return {s["index"] for s in self.manifest["shards"]}

    def add_shard(self, index: int, rows: list[dict], stats: dict) -> None:
        """Store shard `index` (its accepted rows, possibly none) and list it in the manifest.
        `stats`: prompts, samples, rejected (reason -> count), prompt_tokens, completion_tokens."""
        if index in self.done():
            raise ValueError(f"shard {index} is already stored")
        entry = {"index": index, "file": None, "records": len(rows), "sha256": None, **stats}
        path = self.root / DATA / shard_name(index)
        before = self.manifest["shards"]
        with writing(path, self.safe):
            try:
                if rows:
                    table = pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)
                    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
                    entry.update(file=path.name, sha256=sha256_file(path))
                self.manifest["shards"] = sorted(before + [entry], key=lambda s: s["index"])
                self._write_manifest()
            except BaseException:  # the shard is not listed: the state stays the one on disk
                self.manifest["shards"] = before
                path.unlink(missing_ok=True)
                raise

    def set_info(self, **info) -> None:
        """Record run information (teacher identity, tokenizer, prompt counts) in the manifest."""
        self.manifest.update(info)
        with writing(self.root / MANIFEST, self.safe):
            self._write_manifest()

    def finish(self, card: str) -> dict:
        """Mark the run complete and write the dataset card; returns the totals."""
        with writing(self.root, self.safe):
            write_atomic(self.root / "README.md", card.encode())
            self.manifest["complete"] = True
            self._write_manifest()
        return self.totals()

    def safe(self) -> str:
        """What a failed write leaves safe, in words (its error line's end)."""
        n = len(self.manifest["shards"])
        return (f"{n} shard{'s' * (n != 1)} ({self.totals()['records']} records) listed in "
                f"{self.root / MANIFEST} are safe; {FREE} and rerun the same command to resume")

    def totals(self) -> dict:
        """Sums over the stored shards: records, prompts, samples, tokens, rejections by reason."""
        return totals(self.manifest["shards"])

    def _write_manifest(self) -> None:
        self.manifest["totals"] = self.totals()
        text = json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n"
        write_atomic(self.root / MANIFEST, text.encode())


def totals(shards: list[dict]) -> dict:
    rejected: Counter = Counter()
    out = Counter()
    for s in shards:
        rejected.update(s.get("rejected", {}))
        for key in ("records", "prompts", "samples", "prompt_tokens", "completion_tokens"):
            out[key] += s.get(key, 0)
    return {**{k: out[k] for k in ("records", "prompts", "samples", "prompt_tokens",
                                   "completion_tokens")}, "rejected": dict(sorted(rejected.items()))}
