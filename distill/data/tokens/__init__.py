"""A tokenized cache of a trace mixture: every kept trace rendered and tokenised once, written to
disk, memory-mapped by every later run and every process.

The cache lives in `<root>/<key>/`, the key a hash of what it depends on (`cache_inputs`): each
dataset's settings, keep filter and input files, the student tokenizer's fingerprint and the
render settings, so a changed input means a new cache, with one line saying what changed. It holds
every split (each document's held-out rank is stored) and every document at full length (the
over-long policy applies at planning), so seq_len, splits and policies share one cache.
`layout` has the files, `build` how processes and hosts build one together, `reader` the
memory-mapped `TokenCache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from distill.data.tokens.build import CacheSpec, Job, build_cache
from distill.data.tokens.layout import (
    BATCH_TRACES,
    BLOCK_TRACES,
    COMPLETE,
    FORMAT,
    INPUTS,
    RENDER_VERSION,
    content_digest,
    trace_digest,
)
from distill.data.tokens.reader import TokenCache
from distill.data.traces import as_source, trace_inputs
from distill.fsutil import FREE, writing

__all__ = ["BATCH_TRACES", "BLOCK_TRACES", "CacheSpec", "TokenCache", "cache_inputs", "cache_key",
           "content_digest", "open_cache", "trace_digest"]


def cache_inputs(spec: CacheSpec) -> dict:
    """What a cache of `spec` depends on (its key is a hash of this)."""
    tokenizer = spec.tokenizer
    return {"format": FORMAT, "tokenizer": tokenizer.fingerprint(),
            "render": {"version": RENDER_VERSION, "top_k": spec.top_k, "block": spec.block,
                       "vocab": tokenizer.vocab_size},
            "datasets": [trace_inputs(as_source(s), spec.keep) for s in spec.sources]}


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def open_cache(spec: CacheSpec, root: str | Path, *, process_index: int = 0,
               process_count: int = 1, progress: bool = True,
               log: Callable[[str], None] = print) -> TokenCache:
    """The cache of `spec` under `root`, built first where it is missing or incomplete
    (together with the other processes of the run)."""
    inputs = cache_inputs(spec)
    directory = Path(root) / cache_key(inputs)
    if not (directory / COMPLETE).is_file():
        if process_index == 0:
            log(f"tokenized cache: building {directory} ({_why_build(Path(root), directory, inputs)})")
        job = Job(directory, inputs, dataclasses.replace(spec, sources=tuple(spec.sources)))
        with writing(directory, f"the traces are untouched and the cache's finished parts are "
                                f"kept; {FREE} and rerun the same command to finish the build"):
            build_cache(job, process_index, process_count, progress and process_index == 0)
    return TokenCache.open(directory)


# -------------------------------------------------------------------------------------------
# Why a build happens


def _why_build(root: Path, directory: Path, inputs: dict) -> str:
    """One line: what changed since the closest other cache of the same datasets, or why else."""
    if directory.is_dir():
        return "resuming an incomplete build"
    sources = [d["source"] for d in inputs["datasets"]]
    olds = []
    for path in root.glob(f"*/{INPUTS}"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            old = json.loads(path.read_text())
            if [d["source"] for d in old.get("datasets", [])] == sources:
                olds.append((path.stat().st_mtime, old, path.parent))
    if not olds:
        return "no cache of these traces yet"
    # the closest: same tokenizer, then same render settings, then the newest
    _, old, where = max(olds, key=lambda t: (t[1].get("tokenizer") == inputs["tokenizer"],
                                             t[1].get("render") == inputs["render"], t[0]))
    return f"{_difference(old, inputs)} since {where.name}"


def _difference(old: dict, new: dict) -> str:
    if old.get("tokenizer") != new["tokenizer"]:
        return "the student tokenizer changed"
    if old.get("render") != new["render"]:
        changed = [f"{k} {old.get('render', {}).get(k)} -> {v}" for k, v in new["render"].items()
                   if old.get("render", {}).get(k) != v]
        return "the render settings changed (" + ", ".join(changed) + ")"
    for a, b in zip(old["datasets"], new["datasets"], strict=True):
        if a == b:
            continue
        where = b["source"]
        for key in ("spec", "keep", "preset"):
            if a.get(key) != b.get(key):
                return f"the settings of {where} changed ({key})"
        files_a = {f[0]: f[1:] for f in a.get("files", [])}
        files_b = {f[0]: f[1:] for f in b.get("files", [])}
        for name in sorted(files_a.keys() | files_b.keys()):
            if name not in files_a:
                return f"the traces of {where} changed ({name} added)"
            if name not in files_b:
                return f"the traces of {where} changed ({name} removed)"
            if files_a[name] != files_b[name]:
                return f"the traces of {where} changed ({name} modified)"
        return f"the traces of {where} changed (checksums)"
    return "the cache format changed"


# -------------------------------------------------------------------------------------------
# Building
