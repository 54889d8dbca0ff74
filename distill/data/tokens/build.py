"""Building a tokenized cache (layout: `distill.data.tokens.layout`).

Blocks are the unit of work. A process walks every dataset's kept traces in order; at each block
it builds the blocks it claims (an O_EXCL claim file, refreshed while it works) and skips the
others. Process p of P first claims the blocks g with g % P == p (g counting blocks over all
datasets), then any block nobody holds; a claim whose builder died (same host and its pid gone, or
untouched for STALE_S) is taken over. A part is written in a temporary folder and renamed into
place, so a build killed at any point (`kill -9`) leaves whole parts only: the next start keeps them
and builds the rest, and nothing is written twice.

Builders are the processes of a run. Within one, the tokenizer encodes each batch of traces on
every core (it releases the GIL) while worker threads turn the previous batch's ids into arrays and
the main thread reads the next (worker processes, one single-threaded tokenizer each, measured
slower: each must read every row, and they start in seconds). Processes on hosts that share the
cache folder build it together and read each other's lengths; hosts that do not share it each
build it all. Nothing holds more than a few batches of traces, so memory does not grow with the
dataset.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.packing import first_target
from distill.data.prompts import heldout_rank
from distill.data.render import id_dtype, render_traces
from distill.data.tokens.layout import (
    BATCH_TRACES,
    BLOCK_TRACES,
    CLAIMS,
    COMPLETE,
    FORMAT,
    INPUTS,
    PARTS,
    WALKS,
    content_digest,
    digest_hex,
    part_name,
    read_json,
    trace_digest,
)
from distill.data.traces import as_source, dataset_errors, open_traces
from distill.fsutil import fsync_dir, write_atomic

STALE_S = 300.0  # a claim untouched this long (its builder gone) is taken over


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache holds: the traces of `sources` that pass `keep`, rendered by `tokenizer` with
    `top_k` teacher entries per position, in parts of `block` traces."""

    sources: tuple
    keep: str | None
    tokenizer: Any
    top_k: int = 0
    block: int = BLOCK_TRACES


@dataclasses.dataclass(frozen=True)
class Job:
    """What every process building one cache needs: where, the inputs its key hashes, and what."""

    directory: Path
    inputs: dict
    spec: CacheSpec


def build_cache(job: Job, process_index: int = 0, process_count: int = 1,
          progress: bool = True) -> None:
    """Build this process's share of `job`'s cache (with the run's other processes), then seal
    it."""
    for sub in (PARTS, CLAIMS, WALKS):
        (job.directory / sub).mkdir(parents=True, exist_ok=True)
    if not (job.directory / INPUTS).is_file():
        write_atomic(job.directory / INPUTS, json.dumps(job.inputs, indent=1).encode(), unique=True)
    from distill.data.progress import BuildProgress  # rich: only when building

    rows = [d.get("rows") for d in job.inputs["datasets"]]
    with BuildProgress(None if None in rows else sum(rows), enabled=progress) as bar:
        _Builder(job, process_index, process_count, bar).run()
    _finish(job)


# -------------------------------------------------------------------------------------------
# One builder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Builder:
    """Process `process_index` of `process_count`'s share of a cache (see the module docstring)."""

    def __init__(self, job: Job, process_index: int, process_count: int, bar):
        self.job, self.dir, self.block = job, job.directory, job.spec.block
        self.p, self.P, self.bar = process_index, process_count, bar
        self.token_dtype = id_dtype(job.spec.tokenizer.vocab_size)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "process": process_index}
        self.blocks: list[int] = []
        self.built = collections.Counter()  # tokens and documents this process wrote

    def run(self) -> None:
        todo = None  # first walk: every dataset, own blocks first
        while True:
            for i, source in enumerate(self.job.spec.sources):
                if todo is None or todo.get(i):
                    self._walk(i, as_source(source), todo)
            missing = [(i, b) for i, n in enumerate(self.blocks) for b in range(n)
                       if not self._done(i, b)]
            if not missing:
                return
            free = {}
            for i, b in missing:
                if self._claimable(i, b):
                    free.setdefault(i, set()).add(b)
            if not free:  # others are building the rest: wait for them
                self.bar.waiting(len(missing))
                time.sleep(0.5)
            todo = free

    def _walk(self, i: int, source, todo: dict | None) -> None:
        """Read dataset i's kept traces in order, building the blocks this process claims."""
        opened = open_traces(source, self.job.spec.keep)
        seen: collections.Counter = collections.Counter()
        writer, pending, n, shown = None, [], 0, 0
        renderer = _Renderer(self.job.spec.tokenizer, self.job.spec.top_k, opened.rows.where)
        try:
            for n, trace in enumerate(opened.traces(self.job.spec.top_k > 0, seen=seen), start=1):
                if (n - 1) % self.block == 0:
                    if writer is not None:
                        renderer.submit(writer, pending)
                        self._close(writer, renderer)
                    writer, pending = self._start(i, (n - 1) // self.block, todo), []
                if writer is not None:
                    pending.append(trace)
                    if len(pending) == BATCH_TRACES:
                        renderer.submit(writer, pending)
                        pending = []
                if n % BATCH_TRACES == 0 and todo is None:
                    self.bar.advance(seen["traces"] - shown, self.built["tokens"])
                    shown = seen["traces"]
            if writer is not None:
                renderer.submit(writer, pending)
                self._close(writer, renderer)
                writer = None
        finally:
            renderer.close()
            if writer is not None:  # an error: leave nothing half-written, free the block
                writer.abort()
        if todo is None:
            self.bar.advance(seen["traces"] - shown, self.built["tokens"])
        dataset_errors(opened, seen["traces"], n)
        if len(self.blocks) <= i:
            self.blocks.append(-(-n // self.block))
            walk = self.dir / WALKS / f"d{i:03d}.json"
            if not walk.is_file():
                write_atomic(walk, json.dumps({"blocks": self.blocks[i], "traces": n}).encode(),
                             unique=True)

    def _start(self, i: int, b: int, todo: dict | None) -> _PartWriter | None:
        if self._done(i, b):
            return None
        if todo is None:  # first walk: this process's own share
            if (sum(self.blocks[:i]) + b) % self.P != self.p:
                return None
        elif b not in todo.get(i, ()):
            return None
        claim = self.dir / CLAIMS / part_name(i, b)
        if not self._claim(claim):
            return None
        if self._done(i, b):  # finished by another between the check and the claim
            claim.unlink(missing_ok=True)
            return None
        return _PartWriter(self.dir / PARTS / part_name(i, b), claim, self.token_dtype,
                           self.job.spec.top_k, self.me, i, b * self.block)

    def _close(self, writer: _PartWriter, renderer: _Renderer) -> None:
        renderer.drain()
        if writer.finish():
            self.built["tokens"] += writer.tokens
            self.built["documents"] += writer.documents
        writer.claim.unlink(missing_ok=True)

    def _done(self, i: int, b: int) -> bool:
        return (self.dir / PARTS / part_name(i, b) / "meta.json").is_file()

    def _claimable(self, i: int, b: int) -> bool:
        claim = self.dir / CLAIMS / part_name(i, b)
        return not claim.exists() or self._stale(claim)

    def _claim(self, claim: Path) -> bool:
        """Take the claim file (or a dead builder's); False when another process holds it."""
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale(claim):
                    return False
                tomb = claim.with_name(f"{claim.name}.stale-{uuid.uuid4().hex}")
                try:
                    os.rename(claim, tomb)  # only one process wins the rename
                except FileNotFoundError:
                    continue
                tomb.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return True
        return False

    def _stale(self, claim: Path) -> bool:
        try:
            age = time.time() - claim.stat().st_mtime
            holder = json.loads(claim.read_text() or "{}")
        except FileNotFoundError:
            return True
        except (OSError, json.JSONDecodeError):
            return False  # being written
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == os.getpid():
                return False
            if not _pid_alive(holder["pid"]):
                return True
        return age > STALE_S


def _finish(job: Job) -> None:
    """complete.json, from the walks and the parts' metadata (every process of a run may write it:
    the same content), then the claims and dead builders' leftovers go."""
    directory, datasets, digest = job.directory, [], 0
    for i, d in enumerate(job.inputs["datasets"]):
        n = read_json(directory / WALKS / f"d{i:03d}.json", directory)["blocks"]
        metas = [read_json(directory / PARTS / part_name(i, b) / "meta.json", directory)
                 for b in range(n)]
        digest += sum(int(m["digest"], 16) for m in metas)
        datasets.append({"source": d["source"], "blocks": n,
                         **{k: sum(m[k] for m in metas)
                            for k in ("traces", "no_text", "documents", "tokens")}})
    complete = {"format": FORMAT, "top_k": job.spec.top_k,
                "token_dtype": id_dtype(job.spec.tokenizer.vocab_size).name,
                "datasets": datasets, "digest": content_digest(digest)}
    write_atomic(directory / COMPLETE, json.dumps(complete, indent=1).encode(), unique=True)
    shutil.rmtree(directory / CLAIMS, ignore_errors=True)
    host = socket.gethostname()
    for tmp in (directory / PARTS).glob(f".tmp-*-{host}-*"):  # killed builders' leftovers
        if not _pid_alive(int(tmp.name.rsplit("-", 1)[1])):
            shutil.rmtree(tmp, ignore_errors=True)


class _Renderer:
    """Renders batches of traces on worker threads, up to `depth` batches ahead of the reader:
    the tokenizer (which releases the GIL) encodes a batch on every core while another batch's
    ids become arrays and this thread reads the next. Results reach their writer in order."""

    def __init__(self, tokenizer, top_k: int, where: str, depth: int = 2):
        self.args, self.depth = (tokenizer, top_k, where), depth
        self.pool = ThreadPoolExecutor(depth, thread_name_prefix="distill-render")
        self.pending: collections.deque = collections.deque()

    def submit(self, writer: _PartWriter, traces: list) -> None:
        if not traces:
            return
        tokenizer, top_k, where = self.args
        self.pending.append((writer, traces, self.pool.submit(render_traces, tokenizer, traces,
                                                               top_k, where)))
        while len(self.pending) > self.depth:
            self._hand_over()

    def _hand_over(self) -> None:
        writer, traces, future = self.pending.popleft()
        writer.add(traces, future.result())

    def drain(self) -> None:
        """Wait for the batches in flight and hand them to their writers."""
        while self.pending:
            self._hand_over()

    def close(self) -> None:
        for _, _, future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)


class _PartWriter:
    """One block's files, written in a temporary folder and renamed into place by `finish`."""

    def __init__(self, final: Path, claim: Path, token_dtype, top_k: int, me: dict,
                 dataset: int, position: int):
        self.final, self.claim, self.token_dtype, self.top_k, self.me = (
            final, claim, token_dtype, top_k, me)
        self.tmp = final.with_name(f".tmp-{final.name}-{me['host']}-{me['pid']}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        names = ("tokens", "loss") + (("top_ids", "top_logprobs") if top_k else ())
        self.files = {n: open(self.tmp / f"{n}.bin", "wb") for n in names}
        self.ids_file = open(self.tmp / "ids.txt", "w")
        self.cols = {k: [] for k in ("lengths", "first", "prompt", "rank", "teacher_rows")}
        self.dataset, self.position = dataset, position  # of the block's first trace
        self.digest = 0
        self.no_text_rank: list[float] = []  # the held-out ranks of traces without text
        self.teacher_errors: dict[int, str] = {}  # document -> why its top-k did not align
        self.traces = self.no_text = self.tokens = self.rows = 0

    @property
    def documents(self) -> int:
        return len(self.cols["lengths"])

    def add(self, traces: Sequence, rendered: Sequence) -> None:
        for trace, r in zip(traces, rendered, strict=True):
            self.traces += 1
            self.digest += trace_digest(self.dataset, self.position + self.traces - 1, trace.id)
            if r is None:
                self.no_text += 1
                self.no_text_rank.append(heldout_rank(trace.prompt_id))
                continue
            self.files["tokens"].write(r.ids.astype(self.token_dtype).tobytes())
            self.files["loss"].write(r.mask.astype(np.bool_).tobytes())
            self.ids_file.write(("\n" if self.documents else "") + trace.id)
            self.cols["lengths"].append(len(r.ids))
            self.cols["first"].append(first_target(r.mask))
            self.cols["prompt"].append(r.first)
            self.cols["rank"].append(heldout_rank(trace.prompt_id))
            self.tokens += len(r.ids)
            rows = -1
            if r.teacher_error:
                rows = -2  # misaligned: an error where the document is trained on
                self.teacher_errors[self.documents - 1] = r.teacher_error
            elif self.top_k and r.top_ids is not None:
                rows = len(r.top_ids)
                self.files["top_ids"].write(r.top_ids.astype(self.token_dtype).tobytes())
                self.files["top_logprobs"].write(r.top_logprobs.astype(np.float16).tobytes())
                self.rows += rows
            self.cols["teacher_rows"].append(rows)
        os.utime(self.claim)  # the claim's heartbeat

    def abort(self) -> None:
        for f in (*self.files.values(), self.ids_file):
            with contextlib.suppress(OSError):  # a full disk fails the flush of close() too
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.claim.unlink(missing_ok=True)

    def finish(self) -> bool:
        """Seal the part; False when another process's copy landed first (this one is dropped)."""
        for f in (*self.files.values(), self.ids_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.savez(self.tmp / "index.npz",
                 lengths=np.array(self.cols["lengths"], np.int64),
                 first=np.array(self.cols["first"], np.int64),
                 prompt=np.array(self.cols["prompt"], np.int64),
                 rank=np.array(self.cols["rank"], np.float64),
                 teacher_rows=np.array(self.cols["teacher_rows"], np.int64),
                 no_text_rank=np.array(self.no_text_rank, np.float64))
        meta = {"traces": self.traces, "no_text": self.no_text, "documents": self.documents,
                "tokens": self.tokens, "teacher_rows": self.rows,
                "digest": digest_hex(self.digest), "built_by": self.me,
                "teacher_errors": self.teacher_errors}
        write_atomic(self.tmp / "meta.json", json.dumps(meta).encode())
        try:
            os.rename(self.tmp, self.final)
        except OSError:  # already there: another process finished the block first
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        fsync_dir(self.final.parent)
        return True
