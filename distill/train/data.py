"""Training data: teacher traces -> chat-rendered samples -> packed fixed-length rows, in an order
that is a pure function of (seed, epoch), resumable from a two-number `DataState`.

Rendering (the R1-Distill way). A sample is the prompt rendered with the student's chat template and
`add_generation_prompt=True` (exactly the ids the model sees at inference), then the completion
`{reasoning}\\n</think>\\n\\n{answer}` and the EOS id. The R1 generation prompt already opens
`<think>\\n`; for templates whose generation prompt does not (e.g. ChatML), the completion starts with
`<think>\\n` itself. Prompt and completion are tokenised separately and concatenated, so the boundary
is exact and the loss mask is 1 on the completion tokens (EOS included) and 0 on the prompt.
(Rendering the whole conversation instead would lose the reasoning: the R1 template drops
everything before `</think>` from assistant turns.)

Packing. Each document of n tokens contributes n - 1 (input, target) slots: inputs ids[:-1],
targets ids[1:], loss mask aligned with the targets, so no target crosses a document boundary.
Documents are packed best-fit-decreasing within windows of `window` documents (at most `window`
rows open at once) into rows of exactly `seq_len` slots with segment ids 1..n per row (0 = padding)
and positions restarting at 0 per document. Over-long documents are dropped or truncated to
`seq_len` slots by policy, and counted.

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
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from distill.config import Frozen, InputPath
from distill.errors import DistillError
from distill.traces.prompts import is_heldout

KEEP = ("correct", "complete", "all")
OVERLONG = ("drop", "truncate")
THINK_OPEN = "<think>\n"
_TRACE_COLUMNS = ("id", "prompt", "messages", "reasoning", "answer", "correct", "finish_reason")
_TEACHER_COLUMNS = ("top_ids", "top_logprobs")


class DataConfig(Frozen):
    """The `data:` table of a training config."""

    traces: list[InputPath] = Field(min_length=1)  # teacher_traces/<run> dirs or .parquet files
    weights: list[float] | None = None  # mixture weights, one per dataset (default: their sizes)
    keep: Literal["correct", "complete", "all"] = "correct"
    seq_len: int = Field(4096, ge=2)  # slots per packed row
    batch_size: int = Field(8, ge=1)  # global rows per step
    overlong: Literal["drop", "truncate"] = "drop"
    seed: int = 0
    pack_window: int = Field(256, ge=1)
    top_k: int = Field(0, ge=0)  # teacher top-k entries per position for logit KD (0: none)
    # prompts held out (by a hash of the prompt id) for the held-out trace loss, never trained on
    heldout_fraction: float = Field(0.0, ge=0, lt=1)


# ---------------------------------------------------------------------------------------------
# Traces


@dataclasses.dataclass(frozen=True)
class Trace:
    """What training reads of one trace row. top_ids / top_logprobs: per completion token the
    teacher's top-k, as [n, k] arrays (k padded with -inf log-probabilities), or None."""

    id: str
    prompt: str | list[dict]
    reasoning: str
    answer: str
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Kept traces of each dataset, with the datasets' mixture weights and names (their paths)."""

    datasets: tuple[tuple[Trace, ...], ...]
    weights: tuple[float, ...] | None
    names: tuple[str, ...]


def read_traces(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
                keep: str = "correct", with_teacher: bool = False, split: str = "all",
                heldout_fraction: float = 0.0) -> Mixture:
    """Read trace datasets (a teacher_traces/<run> directory of *.parquet shards, or one .parquet
    file each) and keep the rows that pass `keep`: "correct" (correct is true), "complete"
    (finish_reason "stop") or "all". with_teacher also reads the top-k columns. `split` "train" /
    "heldout" keeps the prompts outside / inside the held-out fraction (by prompt-id hash)."""
    if keep not in KEEP:
        raise DistillError(f"unknown keep filter {keep!r}; choose one of {', '.join(KEEP)}")
    if not paths:
        raise DistillError("no trace dataset given")
    if weights is not None:
        _check_weights(weights, len(paths))
    def in_split(trace_id: str) -> bool:
        if split == "all" or heldout_fraction == 0:
            return split != "heldout"
        return is_heldout(trace_id.rsplit("#", 1)[0], heldout_fraction) == (split == "heldout")

    datasets = tuple(_read_dataset(Path(p), keep, with_teacher, in_split) for p in paths)
    return Mixture(datasets, None if weights is None else tuple(float(w) for w in weights),
                   tuple(str(p) for p in paths))


def _check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise DistillError(f"{len(weights)} mixture weights for {n} trace datasets")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DistillError(f"mixture weights must be >= 0 with a positive sum (got {list(weights)})")


def _shards(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    if (path / "manifest.json").is_file():  # a `distill generate` run: checksums verified
        from distill.traces.store import shard_paths

        files = shard_paths(path)
        if files:
            return files
        raise DistillError(f"{path}: the trace run holds no records (an empty trace dataset)")
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if files:
            return files
        raise DistillError(f"{path}: no .parquet shards (an empty trace dataset)")
    raise DistillError(f"{path}: no such trace dataset (want a directory of .parquet shards)")


def _read_dataset(path: Path, keep: str, with_teacher: bool, in_split=lambda _: True
                  ) -> tuple[Trace, ...]:
    import pyarrow.parquet as pq

    columns = _TRACE_COLUMNS + (_TEACHER_COLUMNS if with_teacher else ())
    kept, rows = [], 0
    for shard in _shards(path):
        try:
            names = set(pq.read_schema(shard).names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise DistillError(f"{shard}: not a trace shard (no column {missing[0]!r})")
            table = pq.read_table(shard, columns=list(columns))
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DistillError(f"{shard}: cannot read parquet: {str(e).splitlines()[0]}") from e
        rows += table.num_rows
        kept += [_trace(row, table, i) for i, row in enumerate(table.select(_TRACE_COLUMNS)
                                                               .to_pylist())
                 if _keep(row, keep) and in_split(row["id"])]
    if rows == 0:
        raise DistillError(f"{path}: the trace dataset is empty (0 rows)")
    if not kept:
        raise DistillError(f"{path}: no trace passes keep={keep!r} (0 of {rows} rows)")
    return tuple(kept)


def _keep(row: dict, keep: str) -> bool:
    if keep == "correct":
        return row["correct"] is True
    if keep == "complete":
        return row["finish_reason"] == "stop"
    return True


def _trace(row: dict, table, i: int) -> Trace:
    prompt = row["messages"] or row["prompt"] or ""
    top_ids = top_lps = None
    if "top_ids" in table.column_names and table.column("top_ids")[i].is_valid:
        top_ids, top_lps = _topk_arrays(table.column("top_ids")[i], table.column("top_logprobs")[i])
    return Trace(id=row["id"], prompt=prompt, reasoning=row["reasoning"] or "",
                 answer=row["answer"] or "", top_ids=top_ids, top_logprobs=top_lps)


def _topk_arrays(ids_scalar, lps_scalar) -> tuple[np.ndarray, np.ndarray]:
    """One row's list<list<...>> top-k cells -> ids int32 [n, k], log-probs float32 [n, k]."""
    ids_list, lps_list = ids_scalar.values, lps_scalar.values
    widths = ids_list.value_lengths().to_numpy(zero_copy_only=False)
    n, k = len(widths), int(widths.max()) if len(widths) else 0
    ids = np.zeros((n, k), np.int32)
    lps = np.full((n, k), -np.inf, np.float32)
    cols = np.arange(k)[None, :] < widths[:, None]
    ids[cols] = ids_list.flatten().to_numpy(zero_copy_only=False)
    lps[cols] = lps_list.flatten().to_numpy(zero_copy_only=False)
    return ids, lps


# ---------------------------------------------------------------------------------------------
# Rendering


def render_example(tokenizer, prompt: str | list[dict], reasoning: str, answer: str):
    """(ids int32 [n], loss_mask bool [n]): the prompt as the model sees it at inference (chat
    template with the generation prompt), then `{reasoning}\\n</think>\\n\\n{answer}` and EOS,
    with the loss on the completion tokens only. Reasoning and answer are stripped first."""
    reasoning, answer = (reasoning or "").strip(), (answer or "").strip()
    if not reasoning and not answer:
        raise DistillError("no assistant text: the reasoning and the answer are both empty")
    prompt_ids, completion_text = _render(tokenizer, prompt, reasoning, answer)
    completion_ids = tokenizer.encode(completion_text, add_special_tokens=False)
    completion_ids.append(_eos_id(tokenizer))
    ids = np.asarray(prompt_ids + completion_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return ids, mask


def _render(tokenizer, prompt, reasoning: str, answer: str) -> tuple[list[int], str]:
    """Prompt ids (generation prompt included) and the completion text that follows them."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    body = f"{reasoning}\n</think>\n\n{answer}"
    completion = body if prompt_text.endswith(THINK_OPEN) else THINK_OPEN + body
    return tokenizer.encode(prompt_text, add_special_tokens=False), completion


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DistillError("the student tokenizer has no EOS token; samples could not end")
    return int(tokenizer.eos_token_id)


# ---------------------------------------------------------------------------------------------
# Documents (tokenised samples) and packing


@dataclasses.dataclass
class Documents:
    """Tokenised samples in flat arrays. Document d is tokens[offsets[d]:offsets[d + 1]] with its
    loss mask; teacher[d] is None or (first completion token index, ids [c, K], log-probs [c, K])."""

    tokens: np.ndarray  # int32 [total]
    loss: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [n + 1]
    teacher: list | None = None

    @classmethod
    def build(cls, examples: Sequence[tuple[np.ndarray, np.ndarray]], teacher=None) -> Documents:
        lengths = [len(ids) for ids, _ in examples]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        if not examples:
            return cls(np.zeros(0, np.int32), np.zeros(0, bool), offsets, teacher)
        return cls(np.concatenate([np.asarray(i, np.int32) for i, _ in examples]),
                   np.concatenate([np.asarray(m, bool) for _, m in examples]), offsets, teacher)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[d], self.offsets[d + 1]
        return self.tokens[lo:hi], self.loss[lo:hi]

    def slots(self, seq_len: int) -> np.ndarray:
        """Input/target slots each document takes in a row: n - 1 tokens, at most seq_len."""
        return np.minimum(np.diff(self.offsets) - 1, seq_len)


@dataclasses.dataclass(frozen=True)
class PackStats:
    """How well rows are filled: efficiency = real (input, target) slots / (rows * seq_len)."""

    rows: int
    slots: int
    seq_len: int

    @property
    def efficiency(self) -> float:
        return self.slots / max(self.rows * self.seq_len, 1)


def plan_rows(order: np.ndarray, slots: np.ndarray, seq_len: int, window: int = 256) -> list[list]:
    """Best-fit-decreasing packing of the documents `order` (indices into `slots`) into rows of
    `seq_len` slots: within each window of `window` documents, longest first, each document goes
    to the open row it fills best, or opens a row; with `window` rows open, the fullest is closed.
    Returns rows as lists of document indices, in the order they were closed."""
    rows: list[list] = []
    open_docs: list[list] = []
    free = np.zeros(0, np.int64)  # free slots of each open row
    for start in range(0, len(order), window):
        win = np.asarray(order[start:start + window])
        for d in win[np.argsort(-slots[win], kind="stable")]:
            size = int(slots[d])
            fits = np.flatnonzero(free >= size)
            if len(fits):
                r = int(fits[np.argmin(free[fits])])
            else:
                if len(open_docs) >= window:  # close the fullest row to bound the open set
                    full = int(np.argmin(free))
                    rows.append(open_docs.pop(full))
                    free = np.delete(free, full)
                open_docs.append([])
                free = np.append(free, seq_len)
                r = len(open_docs) - 1
            open_docs[r].append(int(d))
            free[r] -= size
            if free[r] == 0:
                rows.append(open_docs.pop(r))
                free = np.delete(free, r)
    return rows + open_docs


def build_rows(docs: Documents, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0,
               top_k: int = 0) -> dict[str, np.ndarray]:
    """Arrays for packed rows (an empty row is all padding): tokens_bt, targets_bt, loss_mask_bt,
    segment_ids_bt (1..n, 0 = padding), positions_bt (from 0 per document) and, with top_k,
    top_ids_btk / top_logprobs_btk (-inf where the teacher has no entry)."""
    b = len(rows)
    out = {"tokens_bt": np.full((b, seq_len), pad_id, np.int32),
           "targets_bt": np.zeros((b, seq_len), np.int32),
           "loss_mask_bt": np.zeros((b, seq_len), bool),
           "segment_ids_bt": np.zeros((b, seq_len), np.int32),
           "positions_bt": np.zeros((b, seq_len), np.int32)}
    if top_k:
        out["top_ids_btk"] = np.zeros((b, seq_len, top_k), np.int32)
        out["top_logprobs_btk"] = np.full((b, seq_len, top_k), -np.inf, np.float32)
    for r, row in enumerate(rows):
        at = 0
        for segment, d in enumerate(row, start=1):
            at = _place(out, docs, d, r, at, segment, seq_len, top_k)
    return out


def _place(out: dict, docs: Documents, d: int, r: int, at: int, segment: int, seq_len: int,
           top_k: int) -> int:
    """Write document d into row r from slot `at`; return the next free slot."""
    ids, mask = docs.doc(d)
    n = min(len(ids) - 1, seq_len)
    if at + n > seq_len:
        raise ValueError(f"row {r} overflows: document {d} needs {n} slots, {seq_len - at} left")
    span = slice(at, at + n)
    out["tokens_bt"][r, span] = ids[:n]
    out["targets_bt"][r, span] = ids[1:n + 1]
    out["loss_mask_bt"][r, span] = mask[1:n + 1]
    out["segment_ids_bt"][r, span] = segment
    out["positions_bt"][r, span] = np.arange(n)
    if top_k and docs.teacher is not None and docs.teacher[d] is not None:
        first, t_ids, t_lps = docs.teacher[d]
        # completion token j is the target of the document's slot first + j - 1
        j0 = max(0, 1 - first)
        j1 = max(j0, min(len(t_ids), n + 1 - first))
        slot = at + first - 1
        out["top_ids_btk"][r, slot + j0:slot + j1] = t_ids[j0:j1]
        out["top_logprobs_btk"][r, slot + j0:slot + j1] = t_lps[j0:j1]
    return at + n


def pack(examples: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, policy: str = "drop",
         window: int = 256, pad_id: int = 0) -> tuple[dict[str, np.ndarray], PackStats, dict]:
    """Pack (ids, loss_mask) examples in their order into rows of `seq_len` slots.

    Returns the row arrays (see `build_rows`), the packing stats and the counts
    {"documents", "dropped_overlong", "truncated"}. policy: "drop" or "truncate" over-long
    documents (more than seq_len + 1 tokens).
    """
    kept, counts = [], {"documents": 0, "dropped_overlong": 0, "truncated": 0}
    for i, (ids, mask) in enumerate(examples):
        status = _fit(np.asarray(mask, bool), seq_len, policy, f"example {i}")
        if status == "dropped":
            counts["dropped_overlong"] += 1
            continue
        counts["truncated"] += status == "truncated"
        kept.append((ids, mask))
    counts["documents"] = len(kept)
    docs = Documents.build(kept)
    slots = docs.slots(seq_len)
    rows = plan_rows(np.arange(len(docs)), slots, seq_len, window)
    return (build_rows(docs, rows, seq_len, pad_id), PackStats(len(rows), int(slots.sum()),
                                                               seq_len), counts)


def _fit(mask: np.ndarray, seq_len: int, policy: str, where: str) -> str:
    """"fits", "truncated" or "dropped" for a document under the over-long policy."""
    if policy not in OVERLONG:
        raise DistillError(f"unknown over-long policy {policy!r}; choose one of "
                           f"{', '.join(OVERLONG)}")
    if len(mask) - 1 <= seq_len:
        return "fits"
    if policy == "drop":
        return "dropped"
    if not np.any(mask[1:seq_len + 1]):
        prompt = int(np.argmax(mask)) if mask.any() else len(mask)
        raise DistillError(f"{where}: the prompt is {prompt} tokens, so seq_len {seq_len} leaves "
                           "no completion token to train on; raise seq_len or set overlong: drop")
    return "truncated"


# ---------------------------------------------------------------------------------------------
# The training stream


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
        _check_stream(seq_len, batch_size, overlong, window, top_k, process_index, process_count)
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


def _check_stream(seq_len, batch_size, overlong, window, top_k, process_index, process_count):
    if seq_len < 2:
        raise DistillError(f"seq_len must be >= 2 (got {seq_len})")
    if overlong not in OVERLONG:
        raise DistillError(f"unknown over-long policy {overlong!r}; choose one of "
                           f"{', '.join(OVERLONG)}")
    if window < 1 or top_k < 0:
        raise DistillError(f"pack_window must be >= 1 and top_k >= 0 (got {window}, {top_k})")
    if not 0 <= process_index < process_count:
        raise DistillError(f"process index {process_index} is outside 0..{process_count - 1}")
    if batch_size < 1 or batch_size % process_count:
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
            status = _fit(mask, seq_len, overlong, f"{name}: trace {trace.id}")
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
