"""`distill train`'s data stream: teacher traces (`distill.data.traces`) -> rendered samples
(`distill.data.render`) -> packed rows (`distill.data.packing`), in an order that is a pure function
of (seed, epoch), resumable from a two-number `DataState`.

Order. An epoch is the mixture of the datasets (each dataset's share of the epoch is its weight;
a dataset is drawn as fresh seeded permutations, repeated to up-sample or cut to down-sample),
shuffled, packed, and the rows shuffled, all from `numpy.random.default_rng([seed, epoch])`. A
global batch is `batch_size` consecutive rows; process p of P builds only rows
[p * batch_size / P, (p + 1) * batch_size / P) of it (the contiguous layout
`jax.make_array_from_process_local_data` expects for a batch sharded over the data axes). The
last batch of an epoch is completed with empty rows (loss mask 0). `DataState(epoch, index)`
counts the global batches consumed and is saved with the checkpoint; resuming from it gives the
same subsequent batches.

A plain NumPy pipeline rather than Grain: the order needs every document's student token count
(for best-fit packing over windows) and must be recomputable from two integers on every process;
that is a few array operations here, while Grain's packing iterators checkpoint their own iterator
state and would add a dependency. Every process tokenises the whole dataset (the lengths decide the
plan) but assembles only its own rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import numpy as np
from pydantic import Field

from distill.config import Frozen, validate
from distill.data.packing import (
    Documents,
    Overlong,
    PackStats,
    build_rows,
    overlong_status,
    plan_rows,
)
from distill.data.render import render_example
from distill.data.traces import Keep, Mixture, Trace, TraceSpec, read_traces
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
    # ({source, preset, config, split, keep, system, columns, limit}: distill.data.traces)
    traces: list[TraceSpec] = Field(min_length=1)
    weights: list[float] | None = None  # mixture weights, one per dataset (default: their sizes)
    keep: Keep | None = None  # default: each source's (correct where rows carry verdicts)
    # prompts held out (by a hash of the prompt id) for the held-out trace loss, never trained on
    heldout_fraction: float = Field(0.0, ge=0, lt=1)


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


class TrainData:
    """Packed training batches from a trace mixture, for one process of `process_count`.

    `batches(state)` yields (local batch arrays, state after the batch) forever, epoch after epoch;
    every array has `batch_size // process_count` rows of `seq_len` slots (see `build_rows`).
    """

    def __init__(self, mixture: Mixture, tokenizer, *, seq_len: int, batch_size: int,
                 seed: int = 0, overlong: str = "drop", window: int = 256, top_k: int = 0,
                 process_index: int = 0, process_count: int = 1):
        validate(StreamConfig, {"seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                                "overlong": overlong, "pack_window": window, "top_k": top_k},
                 "data")  # one definition of the bounds: DataConfig's
        _check_processes(batch_size, process_index, process_count)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.window, self.top_k = window, top_k
        self.process_index, self.process_count = process_index, process_count
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.weights = mixture.weights or tuple(float(len(d)) for d in mixture.datasets)
        self.counts = DataCounts()
        self.docs, self.dataset_docs = _tokenise(mixture, tokenizer, seq_len, overlong, top_k,
                                                 self.counts)
        self.slots = self.docs.slots(seq_len)
        self.fingerprint = _fingerprint(mixture, self.weights, seq_len, batch_size, seed, overlong,
                                        window, top_k)
        self._plan: tuple[int, list] | None = None

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer, process_index: int = 0,
                    process_count: int = 1, split: str = "train") -> TrainData:
        mixture = read_traces(cfg.traces, cfg.weights, cfg.keep, with_teacher=cfg.top_k > 0,
                              split=split, heldout_fraction=cfg.heldout_fraction)
        return cls(mixture, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                   seed=cfg.seed, overlong=cfg.overlong, window=cfg.pack_window, top_k=cfg.top_k,
                   process_index=process_index, process_count=process_count)

    # -- the order ------------------------------------------------------------------------------

    def epoch_rows(self, epoch: int) -> list[list]:
        """The packed rows of `epoch` in training order (the same on every process)."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = _mixture_order(self.dataset_docs, self.weights, rng)
            rows = plan_rows(order, self.slots, self.seq_len, self.window)
            self._plan = (epoch, [rows[i] for i in rng.permutation(len(rows))])
        return self._plan[1]

    def pack_stats(self, epoch: int = 0) -> PackStats:
        rows = self.epoch_rows(epoch)
        return PackStats(len(rows), int(sum(self.slots[d] for r in rows for d in r)), self.seq_len)

    def steps_per_epoch(self, epoch: int) -> int:
        return -(-len(self.epoch_rows(epoch)) // self.batch_size)

    def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This process's share of global batch `index` of `epoch`."""
        local = self.batch_size // self.process_count
        start = index * self.batch_size + self.process_index * local
        rows = self.epoch_rows(epoch)[start:start + local]
        rows = list(rows) + [[] for _ in range(local - len(rows))]  # complete the last batch
        return build_rows(self.docs, rows, self.seq_len, self.pad_id, self.top_k)

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


def _tokenise(mixture: Mixture, tokenizer, seq_len: int, overlong: str, top_k: int,
              counts: DataCounts) -> tuple[Documents, list[np.ndarray]]:
    """Render every kept trace, apply the over-long policy, align teacher top-k; count it all."""
    examples, teacher, dataset_docs = [], [], []
    for name, traces in zip(mixture.names, mixture.datasets, strict=True):
        first = len(examples)
        no_text = overlong_dropped = 0
        for trace in traces:
            counts.traces += 1
            try:
                ids, mask = render_example(tokenizer, trace.prompt, trace.reasoning, trace.answer)
            except DistillError as e:
                if not str(e).startswith("no assistant text"):
                    raise
                no_text += 1
                continue
            status = overlong_status(mask, seq_len, overlong, f"{name}: trace {trace.id}")
            if status == "dropped":
                overlong_dropped += 1
                continue
            counts.truncated += status == "truncated"
            examples.append((ids, mask))
            teacher.append(_align_teacher(trace, mask, top_k, tokenizer, name) if top_k else None)
        counts.no_assistant_text += no_text
        counts.dropped_overlong += overlong_dropped
        if len(examples) == first:
            raise DistillError(_none_usable(name, len(traces), no_text, overlong_dropped, seq_len))
        dataset_docs.append(np.arange(first, len(examples)))
    counts.documents = len(examples)
    counts.with_teacher = sum(t is not None for t in teacher)
    if top_k and not counts.with_teacher:
        raise DistillError("logit distillation needs teacher top-k log-probabilities and no "
                           f"trace in {', '.join(mixture.names)} has them (set top_k 0 for SFT)")
    return Documents.build(examples, teacher if top_k else None), dataset_docs


def _none_usable(name: str, n: int, no_text: int, overlong: int, seq_len: int) -> str:
    if no_text == n:
        return f"{name}: no trace has assistant text (reasoning and answer empty in all {n})"
    return (f"{name}: no trace fits in seq_len {seq_len} ({overlong} of {n} too long, "
            f"{no_text} without assistant text); raise seq_len or set overlong: truncate")


def _align_teacher(trace: Trace, mask: np.ndarray, top_k: int, tokenizer, name: str):
    """(first completion token, ids [c, top_k], log-probs [c, top_k]) when the trace's top-k rows
    match the student's completion tokens one to one (the tokenizers agree), else an error."""
    if trace.top_ids is None:
        return None
    first = int(np.argmax(mask))
    completion = len(mask) - first
    rows = len(trace.top_ids)
    if rows not in (completion, completion - 1):  # the teacher may stop before scoring EOS
        raise DistillError(
            f"{name}: trace {trace.id}: {rows} teacher top-k rows but the student tokenizer gives "
            f"{completion} completion tokens; logit distillation needs the teacher's tokenizer "
            "(set top_k 0 and alpha 0 for SFT only)")
    if rows and int(trace.top_ids.max()) >= tokenizer.vocab_size:
        raise DistillError(f"{name}: trace {trace.id}: teacher token id {int(trace.top_ids.max())}"
                           f" is outside the student vocabulary ({tokenizer.vocab_size} ids)")
    ids, lps = _fit_topk(trace.top_ids, trace.top_logprobs, top_k)
    return first, ids, lps


def _fit_topk(ids: np.ndarray, lps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely entries per row (by log-probability), padded with -inf entries."""
    order = np.argsort(-lps, axis=1, kind="stable")[:, :k]
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
    pad = k - ids.shape[1]
    if pad > 0:
        ids = np.pad(ids, ((0, 0), (0, pad)))
        lps = np.pad(lps, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids.astype(np.int32), lps.astype(np.float32)


def _fingerprint(mixture: Mixture, weights, *settings) -> str:
    """A short hash of the trace ids, weights and stream settings the order depends on."""
    h = hashlib.sha256(repr((weights, settings)).encode())
    for traces in mixture.datasets:
        for trace in traces:
            h.update(trace.id.encode() + b"\0")
        h.update(b"\1")
    return h.hexdigest()[:16]
