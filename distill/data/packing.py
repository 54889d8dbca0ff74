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
        status = overlong_status(np.asarray(mask, bool), seq_len, policy, f"example {i}")
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


def overlong_status(mask: np.ndarray, seq_len: int, policy: str, where: str) -> str:
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
