"""Teacher tokens against student tokens over the same text: the alignment that logit
distillation across tokenizers works on.

Both sides are sequences of token bytes (`Tokenizer.token_bytes`, or the bytes a trace stores).
A span closes wherever both sides have a token boundary at the same byte: spans are the
shortest runs of tokens whose bytes are identical on both sides, so every span decodes to the
same text for the teacher and the student (as TRL's GOLD aligns by byte offsets). The teacher's
distribution at a span's first token and the student's at its first token predict the same
event, the span's first bytes; `distill.losses` compares them there (the entries whose bytes
are one student token, exactly, by KL; the rest by ULD's sorted-probability distance).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distill.errors import DistillError

UNMATCHED = -1  # a teacher entry whose bytes are no single student token


@dataclass(frozen=True)
class Spans:
    """Aligned spans, G of them: teacher tokens [teacher_start[g], teacher_stop[g]) and student
    tokens [student_start[g], student_stop[g]) have the same bytes. int64 arrays [G]."""

    teacher_start: np.ndarray
    teacher_stop: np.ndarray
    student_start: np.ndarray
    student_stop: np.ndarray

    def __len__(self) -> int:
        return len(self.teacher_start)


def align(teacher: Sequence[bytes], student: Sequence[bytes]) -> Spans:
    """Spans of identical bytes between two tokenizations of one text (see the module).

    Raises DistillError when the two do not spell the same bytes; one leading space that only
    one side has (a SentencePiece dummy prefix) is not counted as a difference.
    """
    t_len, s_len = _lengths(teacher), _lengths(student)
    t_text, s_text = b"".join(teacher), b"".join(student)
    if t_text != s_text:
        t_len, s_len = _drop_dummy_prefix(t_text, s_text, t_len, s_len)
    t_end, s_end = np.cumsum(t_len), np.cumsum(s_len)
    total = int(t_end[-1]) if len(t_end) else 0
    bounds = np.intersect1d(t_end[t_end > 0], s_end[s_end > 0])
    if total == 0 or not len(bounds):
        return Spans(*(np.zeros(0, np.int64) for _ in range(4)))
    t_stop = np.searchsorted(t_end, bounds, side="right")
    s_stop = np.searchsorted(s_end, bounds, side="right")
    t_stop[-1], s_stop[-1] = len(teacher), len(student)  # trailing empty tokens join the last span
    return Spans(np.concatenate([[0], t_stop[:-1]]), t_stop,
                 np.concatenate([[0], s_stop[:-1]]), s_stop)


def align_loose(teacher: Sequence[bytes], student: Sequence[bytes]) -> Spans:
    """Spans over the parts two tokenizations share, when their texts differ in whitespace (a
    sampled "=\n\n</think>" against a rendering's "=\n</think>") and in a prefix only the
    student has (the `<think>` a template's generation prompt lacks), and in nothing else.

    Within each run of bytes the two texts have in common (difflib's matching blocks), the tokens
    between the first and the last byte where both sides have a token boundary are aligned as
    `align` does; tokens that cross a difference get no span. Raises DistillError when the texts
    differ in more than that."""
    t_text, s_text = b"".join(teacher), b"".join(student)
    if not b"".join(s_text.split()).endswith(b"".join(t_text.split())):
        raise DistillError(f"the teacher's and the student's tokens spell different texts "
                           f"(first difference at byte {_first_difference(t_text, s_text)})")
    t_end, s_end = np.cumsum(_lengths(teacher)), np.cumsum(_lengths(student))
    t_bounds, s_bounds = np.concatenate([[0], t_end]), np.concatenate([[0], s_end])
    parts = []
    matcher = difflib.SequenceMatcher(None, t_text, s_text, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        t_in = t_bounds[(t_bounds >= a) & (t_bounds <= a + size)] - a
        s_in = s_bounds[(s_bounds >= b) & (s_bounds <= b + size)] - b
        common = np.intersect1d(t_in, s_in)
        if len(common) < 2:
            continue
        lo, hi = int(common[0]), int(common[-1])
        i0, i1 = (int(np.searchsorted(t_bounds, a + x)) for x in (lo, hi))
        j0, j1 = (int(np.searchsorted(s_bounds, b + x)) for x in (lo, hi))
        sub = align(teacher[i0:i1], student[j0:j1])
        parts.append((sub.teacher_start + i0, sub.teacher_stop + i0,
                      sub.student_start + j0, sub.student_stop + j0))
    if not parts:
        return Spans(*(np.zeros(0, np.int64) for _ in range(4)))
    return Spans(*(np.concatenate(col) for col in zip(*parts, strict=True)))


def _lengths(pieces: Sequence[bytes]) -> np.ndarray:
    return np.fromiter((len(p) for p in pieces), np.int64, len(pieces))


def _drop_dummy_prefix(t_text, s_text, t_len, s_len):
    """Lengths with the extra leading space of one side taken off its first non-empty token."""
    if t_text == b" " + s_text:
        return _shorten_first(t_len), s_len
    if s_text == b" " + t_text:
        return t_len, _shorten_first(s_len)
    raise DistillError(f"the teacher's and the student's tokens spell different texts "
                       f"(first difference at byte {_first_difference(t_text, s_text)})")


def _shorten_first(lens: np.ndarray) -> np.ndarray:
    lens = lens.copy()
    lens[np.flatnonzero(lens)[0]] -= 1
    return lens


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(diff[0]) if len(diff) else n


def map_entries(entries: Sequence[Sequence[bytes]], ids: dict[bytes, int]) -> np.ndarray:
    """The student id of each teacher top-k entry ([n][k] bytes), UNMATCHED where its bytes are
    no single student token (`ids`: the student's `Tokenizer.ids_by_bytes()`). int32 [n, k] (rows shorter than the longest padded UNMATCHED)."""
    k = max((len(r) for r in entries), default=0)
    out = np.full((len(entries), k), UNMATCHED, np.int32)
    for r, row in enumerate(entries):
        out[r, :len(row)] = [ids.get(b, UNMATCHED) for b in row]
    return out
