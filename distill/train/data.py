"""`distill train`'s data stream: teacher traces (`distill.data.traces`) -> rendered documents,
tokenised once into the memory-mapped cache (`distill.data.tokens`) -> packed rows
(`distill.data.packing`), in an order that is a pure function of (seed, epoch), resumable from a
two-number `DataState`.

Order. An epoch is the mixture of the datasets (each dataset's share of the epoch is its weight;
a dataset is drawn as fresh seeded permutations, repeated to up-sample or cut to down-sample),
shuffled, packed, and the rows shuffled, all from `numpy.random.default_rng([seed, epoch])`. A
global batch is `batch_size` consecutive rows; process p of P builds only rows
[p * batch_size / P, (p + 1) * batch_size / P) of it (the contiguous layout
`jax.make_array_from_process_local_data` expects for a batch sharded over the data axes). The
last batch of an epoch is completed with empty rows (loss mask 0). `DataState(epoch, index)`
counts the global batches consumed and is saved with the checkpoint; resuming from it gives the
same subsequent batches.

The held-out split and the over-long policy are applied here, to the cache's per-document arrays
(held-out rank, lengths, first loss token), so one cache serves every split, seq_len and policy.
A plain NumPy pipeline rather than Grain: the order needs every document's token count (for
best-fit packing over windows) and must be recomputable from two integers on every process; that
is a few array operations over lengths the cache keeps in memory, while Grain's packing iterators
checkpoint their own iterator state and would add a dependency.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from pydantic import Field

from distill.config import Frozen, OutputPath
from distill.data.packing import (
    Documents,
    Overlong,
    PackStats,
    build_rows,
    doc_slots,
    no_completion_left,
    overlong_policy,
    plan_rows,
)
from distill.data.prompts import heldout_rank
from distill.data.render import render_traces
from distill.data.tokens import (
    BATCH_TRACES,
    BLOCK_TRACES,
    CacheSpec,
    content_digest,
    open_cache,
    trace_digest,
)
from distill.data.traces import Keep, Mixture, TraceSpec, check_weights, read_traces
from distill.errors import DistillError


class StreamConfig(Frozen):
    """How kept traces become batches: the settings `TrainData` works from."""

    seq_len: int = Field(4096, ge=2)  # slots per packed row
    batch_size: int = Field(8, ge=1)  # global rows per step
    overlong: Overlong = "drop"
    seed: int = 0
    pack_window: int = Field(256, ge=1)
    top_k: int = Field(0, ge=0)  # teacher top-k entries per position for logit KD (0: none)


class DataConfig(StreamConfig):
    """The `data:` table of a training config: which traces, then how they become batches."""

    # teacher_traces/<run> dirs, trace files or folders, hub names, or TraceSource tables
    # ({source, preset, config, split, keep, drop_system, columns, limit}: distill.data.traces)
    traces: list[TraceSpec] = Field(min_length=1)
    weights: list[float] | None = None  # mixture weights, one per dataset (default: their sizes)
    keep: Keep | None = None  # default: each source's (correct where rows carry verdicts)
    # prompts held out (by a hash of the prompt id) for the held-out trace loss, never trained on
    heldout_fraction: float = Field(0.0, ge=0, lt=1)
    # the tokenized cache (distill.data.tokens): built once, shared by runs and processes;
    # default <output_root>/.cache/tokens. cache: false tokenises in memory at every start.
    cache: bool = True
    cache_dir: OutputPath | None = None
    cache_block: int = Field(BLOCK_TRACES, ge=1)  # traces per cache part (the unit processes share)


@dataclasses.dataclass(frozen=True)
class DataState:
    """Where the data stream stands: `index` global batches of `epoch` consumed. Saved with the
    checkpoint; `fingerprint` ties it to the data and settings it was taken with."""

    epoch: int = 0
    index: int = 0
    fingerprint: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataState:
        try:
            return cls(int(data["epoch"]), int(data["index"]), data.get("fingerprint"))
        except (KeyError, TypeError, ValueError) as e:
            raise DistillError(f"bad data state in checkpoint: {data!r}") from e


@dataclasses.dataclass
class DataCounts:
    """What became of the traces: kept by the filter, dropped, truncated, usable, with a teacher."""

    traces: int = 0
    no_assistant_text: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    documents: int = 0
    with_teacher: int = 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Tokenised documents and what `TrainData` needs to know of the traces they came from.

    `docs`: a `Documents` or `TokenCache` (per document: `lengths`, `first`, `dataset`, `rank`,
    `has_teacher`, `teacher_bad`); `names`: the datasets; `no_text_rank`: per dataset, the held-out
    ranks of its traces without assistant text (they made no document); `digest`: of the trace
    ids; `trace_id(d)` names document d in messages; `weights`: the mixture weights (default:
    each dataset's size)."""

    docs: Any
    names: tuple[str, ...]
    no_text_rank: list[np.ndarray]
    digest: str
    trace_id: Callable[[int], str] | None = None
    weights: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Split:
    """Which prompts a stream trains on: "all", or "train" / "heldout" (held out below
    `fraction`, by `distill.data.prompts.is_heldout` on the stored ranks)."""

    name: str = "all"
    fraction: float = 0.0

    def members(self, rank: np.ndarray) -> np.ndarray:
        """Which of the documents (or traces) with these held-out ranks are in the split."""
        if self.name == "all" or self.fraction == 0:
            return np.full(len(rank), self.name != "heldout")
        return (np.asarray(rank) < self.fraction) == (self.name == "heldout")

    @property
    def tag(self) -> str:
        return f"{self.name if self.fraction else 'all'}/{self.fraction}"


class TrainData:
    """Packed training batches from tokenised documents, for one process of `process_count`.

    Build it with `from_config` (through the tokenized cache) or `from_mixture` (traces already
    read, tokenised in memory). `batches(state)` yields (local batch arrays, state after the
    batch) forever, epoch after epoch; every array has `batch_size // process_count` rows of
    `seq_len` slots (see `build_rows`).
    """

    def __init__(self, corpus: Corpus, stream: StreamConfig, *, split: Split = Split(),
                 pad_id: int = 0, process_index: int = 0, process_count: int = 1):
        """The documents of `corpus` in `split`, batched as `stream` says (its bounds were
        checked where it was validated: one definition, DataConfig's)."""
        _check_processes(stream.batch_size, process_index, process_count)
        self.stream, self.pad_id, self.docs = stream, pad_id, corpus.docs
        self.process_index, self.process_count = process_index, process_count
        docs, names, seq_len = corpus.docs, corpus.names, stream.seq_len
        dataset = docs.dataset
        in_split = split.members(docs.rank)
        no_text = [int(split.members(r).sum()) for r in corpus.no_text_rank]
        traces = [int((in_split & (dataset == i)).sum()) + no_text[i] for i in range(len(names))]
        dropped, truncated, unusable = overlong_policy(docs.lengths, docs.first, seq_len,
                                                       stream.overlong)
        bad = np.flatnonzero(unusable & in_split)
        if len(bad):
            d = int(bad[0])
            trace = corpus.trace_id(d) if corpus.trace_id else d
            raise no_completion_left(f"{names[dataset[d]]}: trace {trace}", int(docs.first[d]),
                                     seq_len)
        use = in_split & ~dropped
        if stream.top_k:
            _check_alignment(docs, use)
        self.dataset_docs = []
        for i, name in enumerate(names):
            mine = dataset == i
            docs_i = np.flatnonzero(use & mine)
            if not len(docs_i):
                raise DistillError(_none_usable(name, traces[i], no_text[i],
                                                int((dropped & mine & in_split).sum()),
                                                int((in_split & mine).sum()), seq_len))
            self.dataset_docs.append(docs_i)
        self.counts = DataCounts(
            traces=int(sum(traces)), no_assistant_text=int(sum(no_text)),
            dropped_overlong=int((dropped & in_split).sum()),
            truncated=int((truncated & in_split).sum()), documents=int(use.sum()),
            with_teacher=int((docs.has_teacher & use).sum()))
        if stream.top_k and not self.counts.with_teacher:
            raise DistillError("logit distillation needs teacher top-k log-probabilities and no "
                               f"trace in {', '.join(names)} has them (set top_k 0 for SFT)")
        # default: each one's size
        self.weights = corpus.weights or tuple(float(t) for t in traces)
        self.slots = doc_slots(docs.lengths, seq_len)
        content = f"{corpus.digest}/{split.tag}"
        self.fingerprint = hashlib.sha256(repr((
            content, self.weights, seq_len, stream.batch_size, stream.seed, stream.overlong,
            stream.pack_window, stream.top_k)).encode()).hexdigest()[:16]
        self._plan: tuple[int, list] | None = None

    @classmethod
    def from_mixture(cls, mixture: Mixture, tokenizer, stream: StreamConfig,
                     split: Split = Split(), *, process_index: int = 0,
                     process_count: int = 1) -> TrainData:
        """From traces already read: rendered and tokenised in memory; `split` "train" /
        "heldout" keeps the prompts outside / inside its fraction, as `read_traces` does."""
        rendered, dataset, ids, rank, no_text_rank = [], [], [], [], []
        content = 0
        for i, (name, group) in enumerate(zip(mixture.names, mixture.datasets, strict=True)):
            no_text_rank.append([])
            for start in range(0, len(group), BATCH_TRACES):
                batch = group[start:start + BATCH_TRACES]
                for j, (trace, r) in enumerate(zip(
                        batch, render_traces(tokenizer, batch, stream.top_k, name), strict=True)):
                    content += trace_digest(i, start + j, trace.id)
                    if r is None:
                        no_text_rank[-1].append(heldout_rank(trace.prompt_id))
                        continue
                    rendered.append(r)
                    ids.append(trace.id)
                    rank.append(heldout_rank(trace.prompt_id))
                    dataset.append(i)
        docs = Documents.from_rendered(rendered)
        docs.dataset, docs.rank = np.array(dataset, np.int32), np.array(rank, np.float64)
        corpus = Corpus(docs, mixture.names, [np.array(r) for r in no_text_rank],
                        content_digest(content), ids.__getitem__, mixture.weights)
        return cls(corpus, stream, split=split, pad_id=_pad_id(tokenizer),
                   process_index=process_index, process_count=process_count)

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer, process_index: int = 0,
                    process_count: int = 1, split: str = "train", cache_root=None,
                    progress: bool = False) -> TrainData:
        """The data a config describes. With `cfg.cache` and a `cache_root` (cfg.cache_dir
        wins), through the tokenized cache, built first if missing; else read and tokenised in
        memory (the same batches). `split`: "train" or "heldout" (by cfg.heldout_fraction)."""
        process = dict(process_index=process_index, process_count=process_count)
        chosen = Split(split, cfg.heldout_fraction)
        root = cfg.cache_dir or cache_root
        if not cfg.cache or root is None:
            mixture = read_traces(cfg.traces, cfg.weights, cfg.keep, with_teacher=cfg.top_k > 0)
            return cls.from_mixture(mixture, tokenizer, cfg, chosen, **process)
        if cfg.weights is not None:
            check_weights(cfg.weights, len(cfg.traces))
        spec = CacheSpec(tuple(cfg.traces), cfg.keep, tokenizer, cfg.top_k, cfg.cache_block)
        cache = open_cache(spec, root, progress=progress, **process)
        weights = None if cfg.weights is None else tuple(map(float, cfg.weights))
        corpus = Corpus(cache, cache.names, cache.no_text_rank, cache.digest, cache.trace_id,
                        weights)
        return cls(corpus, cfg, split=chosen, pad_id=_pad_id(tokenizer), **process)

    # -- the order ------------------------------------------------------------------------------

    def epoch_rows(self, epoch: int) -> list[list]:
        """The packed rows of `epoch` in training order (the same on every process)."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.stream.seed, epoch])
            order = _mixture_order(self.dataset_docs, self.weights, rng)
            rows = plan_rows(order, self.slots, self.stream.seq_len, self.stream.pack_window)
            self._plan = (epoch, [rows[i] for i in rng.permutation(len(rows))])
        return self._plan[1]

    def pack_stats(self, epoch: int = 0) -> PackStats:
        rows = self.epoch_rows(epoch)
        slots = int(sum(self.slots[d] for r in rows for d in r))
        return PackStats(len(rows), slots, self.stream.seq_len)

    def steps_per_epoch(self, epoch: int) -> int:
        return -(-len(self.epoch_rows(epoch)) // self.stream.batch_size)

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This process's share of global batch `index` of `epoch`."""
        local = self.stream.batch_size // self.process_count
        start = index * self.stream.batch_size + self.process_index * local
        rows = self.epoch_rows(epoch)[start:start + local]
        rows = list(rows) + [[] for _ in range(local - len(rows))]  # complete the last batch
        return build_rows(self.docs, rows, self.stream.seq_len, self.pad_id, self.stream.top_k)

    def batches(self, state: DataState | None = None) -> Iterator[tuple[dict, DataState]]:
        """Batches from `state` on, each with the state to save after it."""
        state = state or DataState()
        if state.fingerprint is not None and state.fingerprint != self.fingerprint:
            raise DistillError("the training data or its settings changed since the checkpoint "
                               f"(data fingerprint {state.fingerprint} != {self.fingerprint}); "
                               "resume with the same traces, seed, seq_len and batch_size")
        epoch, index = state.epoch, state.index
        while True:
            if index >= self.steps_per_epoch(epoch):
                epoch, index = epoch + 1, 0
                continue
            batch = self.batch(epoch, index)
            index += 1
            yield batch, DataState(epoch, index, self.fingerprint)


def _check_alignment(docs, use: np.ndarray, tolerated: float = 0.01) -> None:
    """Trained-on traces whose top-k rows do not match their tokens: a few (at most `tolerated`
    of those with top-k; e.g. a completion whose stored reasoning lost text) train without logit
    targets, with a warning; more mean another tokenizer, an error."""
    bad = np.flatnonzero(docs.teacher_bad & use)
    if not len(bad):
        return
    with_topk = int((docs.has_teacher & use).sum()) + len(bad)
    first = docs.teacher_error(int(bad[0]))
    if len(bad) > tolerated * with_topk:
        raise DistillError(f"{first} ({len(bad)} of {with_topk} traces with top-k)")
    print(f"warning: {len(bad)} of {with_topk} traces with top-k train without logit targets: "
          f"their top-k rows do not line up with their tokens; the first: {first}")


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise DistillError(f"process index {process_index} is outside 0..{process_count - 1}")
    if batch_size % process_count:
        raise DistillError(f"batch_size {batch_size} must be a positive multiple of the "
                           f"{process_count} processes")


def _mixture_order(dataset_docs: list[np.ndarray], weights, rng) -> np.ndarray:
    """One epoch's documents: dataset i gets a share of the epoch proportional to its weight
    (the epoch has as many documents as all datasets together), drawn as seeded permutations of
    its documents (repeated to up-sample), then all shuffled."""
    sizes = np.array([len(d) for d in dataset_docs])
    w = np.asarray(weights, np.float64) * (sizes > 0)
    exact = w / w.sum() * sizes.sum()
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[:sizes.sum() - quota.sum()]] += 1
    parts = []
    for docs, q in zip(dataset_docs, quota, strict=True):
        if q:
            reps = -(-int(q) // len(docs))
            parts.append(np.concatenate([rng.permutation(docs) for _ in range(reps)])[:q])
    return rng.permutation(np.concatenate(parts))


def _none_usable(name: str, n: int, no_text: int, overlong: int, in_split: int,
                 seq_len: int) -> str:
    if no_text == n:
        return f"{name}: no trace has assistant text (reasoning and answer empty in all {n})"
    if not in_split:
        return f"{name}: no trace with assistant text is in this split (of {n - no_text})"
    return (f"{name}: no trace fits in seq_len {seq_len} ({overlong} of {n} too long, "
            f"{no_text} without assistant text); raise seq_len or set overlong: truncate")
