"""Packing tokenised documents into fixed-length rows.

Each document of n tokens contributes n - 1 (input, target) slots: inputs ids[:-1], targets
ids[1:], loss mask aligned with the targets, so no target crosses a document boundary. Documents
are packed best-fit-decreasing within windows of `window` documents (at most `window` rows open at
once) into rows of exactly `seq_len` slots with segment ids 1..n per row (0 = padding) and
positions restarting at 0 per document. Over-long documents are dropped or truncated to `seq_len`
slots by policy, and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import numpy as np

from distill.errors import DistillError

Overlong = Literal["drop", "truncate"]  # what happens to a document longer than a row
OVERLONG: tuple[str, ...] = get_args(Overlong)


@dataclasses.dataclass
class Documents:
    """Tokenised samples in flat arrays, in memory. Document d is tokens[offsets[d]:offsets[d + 1]]
    with its loss mask; teacher[d] is None or (first completion token index, ids [c, K],
    log-probs [c, K]). `distill.data.tokens.TokenCache` is the same interface over a
    memory-mapped cache: `len`, `lengths`, `first`, `has_teacher`, `doc(d)`, `teacher_of(d)`."""

    tokens: np.ndarray  # int32 [total]
    loss: np.ndarray  # bool [total]
    offsets: np.ndarray  # int64 [n + 1]
    teacher: list | None = None
    dataset: np.ndarray | None = None  # int32 [n]: which dataset of a mixture each came from
    rank: np.ndarray | None = None  # float64 [n]: each prompt's held-out rank (prompts.heldout_rank)
    teacher_errors: dict | None = None  # document -> why its top-k could not be aligned

    @classmethod
    def build(cls, examples: Sequence[tuple[np.ndarray, np.ndarray]], teacher=None) -> Documents:
        lengths = [len(ids) for ids, _ in examples]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        if not examples:
            return cls(np.zeros(0, np.int32), np.zeros(0, bool), offsets, teacher)
        return cls(np.concatenate([np.asarray(i, np.int32) for i, _ in examples]),
                   np.concatenate([np.asarray(m, bool) for _, m in examples]), offsets, teacher)

    @classmethod
    def from_rendered(cls, rendered: Sequence) -> Documents:
        """From `distill.data.render.Rendered` samples (their teacher entries kept)."""
        teacher = [None if r.top_ids is None else (r.first, r.top_ids, r.top_logprobs)
                   for r in rendered]
        docs = cls.build([(r.ids, r.mask) for r in rendered], teacher)
        docs.teacher_errors = {d: r.teacher_error for d, r in enumerate(rendered)
                               if r.teacher_error}
        return docs

    @property
    def teacher_bad(self) -> np.ndarray:
        """Documents whose teacher top-k could not be aligned (see `teacher_error`)."""
        bad = np.zeros(len(self), bool)
        bad[list(self.teacher_errors or ())] = True
        return bad

    def teacher_error(self, d: int) -> str | None:
        return (self.teacher_errors or {}).get(d)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def first(self) -> np.ndarray:
        """Each document's `first_target` (its prompt's length)."""
        return np.array([first_target(self.doc(d)[1]) for d in range(len(self))], np.int64)

    @property
    def has_teacher(self) -> np.ndarray:
        return np.array([t is not None for t in self.teacher or [None] * len(self)], bool)

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[d], self.offsets[d + 1]
        return self.tokens[lo:hi], self.loss[lo:hi]

    def teacher_of(self, d: int):
        """None, or (first completion token, top-k ids [c, K], log-probs [c, K])."""
        return None if self.teacher is None else self.teacher[d]

    def slots(self, seq_len: int) -> np.ndarray:
        """Input/target slots each document takes in a row: n - 1 tokens, at most seq_len."""
        return doc_slots(self.lengths, seq_len)


def doc_slots(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Input/target slots of documents of `lengths` tokens: n - 1, at most seq_len."""
    return np.minimum(np.asarray(lengths, np.int64) - 1, seq_len)


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
    teacher = docs.teacher_of(d) if top_k else None
    if teacher is not None:
        first, t_ids, t_lps = teacher
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
    examples = [(np.asarray(i), np.asarray(m, bool)) for i, m in examples]
    lengths = np.array([len(i) for i, _ in examples], np.int64)
    first = np.array([first_target(m) for _, m in examples], np.int64)
    dropped, truncated, unusable = overlong_policy(lengths, first, seq_len, policy)
    if unusable.any():
        i = int(np.argmax(unusable))
        raise no_completion_left(f"example {i}", int(first[i]), seq_len)
    kept = [e for e, d in zip(examples, dropped, strict=True) if not d]
    counts = {"documents": len(kept), "dropped_overlong": int(dropped.sum()),
              "truncated": int(truncated.sum())}
    docs = Documents.build(kept)
    slots = docs.slots(seq_len)
    rows = plan_rows(np.arange(len(docs)), slots, seq_len, window)
    return (build_rows(docs, rows, seq_len, pad_id), PackStats(len(rows), int(slots.sum()),
                                                               seq_len), counts)


def first_target(mask: np.ndarray) -> int:
    """Index of a document's first loss token among its targets (tokens 1..n-1; n if none): a
    rendered trace's prompt length."""
    hits = np.flatnonzero(mask[1:])
    return int(hits[0]) + 1 if len(hits) else len(mask)


def overlong_policy(lengths: np.ndarray, first: np.ndarray, seq_len: int, policy: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dropped, truncated, unusable) masks of documents of `lengths` tokens under the over-long
    policy (a document over seq_len + 1 tokens is dropped, or truncated to seq_len slots);
    unusable: truncation would leave no loss token (`first`: `first_target` of each)."""
    if policy not in OVERLONG:
        raise DistillError(f"unknown over-long policy {policy!r}; choose one of "
                           f"{', '.join(OVERLONG)}")
    over = np.asarray(lengths) - 1 > seq_len
    none = np.zeros_like(over)
    if policy == "drop":
        return over, none, none
    return none, over, over & (np.asarray(first) > seq_len)


def no_completion_left(where: str, prompt: int, seq_len: int) -> DistillError:
    return DistillError(f"{where}: the prompt is {prompt} tokens, so seq_len {seq_len} leaves "
                        "no completion token to train on; raise seq_len or set overlong: drop")
