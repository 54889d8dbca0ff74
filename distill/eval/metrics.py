"""Evaluation metrics: pure functions of per-sample outcomes, no model in sight.

Shapes: P prompts, k samples per prompt; `correct_pk` is a bool (or 0/1) array [P, k].

- pass@1 = mean over prompts of (correct samples / k): the expected accuracy of one sample
  (DeepSeek-R1's pass@1 over k samples).
- Its 95% interval treats the prompts as a sample from the task's prompt population, the way
  clustered data is treated in survey statistics (and in "Adding Error Bars to Evals", Miller 2024):
  the standard error is the clustered one, SE = sd(per-prompt accuracies) / sqrt(P), so the k
  samples of one prompt count as one cluster, not k independent draws. The interval is Wilson's
  score interval at the effective sample size n_eff = p (1 - p) / SE^2 (Korn & Graubard 1998),
  capped at P * k and taken as P * k when SE is 0. Wilson rather than p +/- z SE keeps the interval
  inside [0, 1] and non-empty when every sample is right or wrong. With k = 1 it is (nearly) the
  plain Wilson interval over prompts. A simulation test checks ~95% coverage.
- cons@n: per prompt, the answer most samples gave (answers compared after
  `distill.verify.normalize_answer`, whitespace ignored; samples without an answer do not
  vote; a tie goes to the answer seen first) is checked; the fraction of prompts where it is right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from distill.chat import split_think
from distill.verify import normalize_answer


def z_value(level: float = 0.95) -> float:
    """The two-sided normal quantile of a confidence level (1.96 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion `p` observed over `n` (possibly effective, not
    whole) trials."""
    if n <= 0:
        return 0.0, 1.0
    z2 = z_value(level) ** 2
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = np.sqrt(z2) / denom * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def pass_at_1(correct_pk) -> float:
    """Mean over prompts of the fraction of correct samples."""
    c = np.asarray(correct_pk, dtype=np.float64)
    return float(c.mean(axis=1).mean()) if c.size else 0.0


def effective_n(correct_pk) -> float:
    """n_eff = p (1 - p) / SE^2 with the clustered SE over prompts, in [1, P * k]."""
    c = np.asarray(correct_pk, dtype=np.float64)
    p_count, k = c.shape
    x = c.mean(axis=1)  # per-prompt accuracy [P]
    p = float(x.mean())
    se2 = float(x.var(ddof=1)) / p_count if p_count > 1 else 0.0
    if se2 <= 0.0:
        return float(p_count * k)
    return float(min(max(p * (1 - p) / se2, 1.0), p_count * k))


def pass_at_1_ci(correct_pk, level: float = 0.95) -> tuple[float, float]:
    """The interval for pass@1 described in the module docstring."""
    c = np.asarray(correct_pk, dtype=np.float64)
    if c.size == 0:
        return 0.0, 1.0
    return wilson_interval(pass_at_1(c), effective_n(c), level)


def answer_key(answer: str | None) -> str | None:
    """What two answers must share to vote together: the normalised answer without whitespace."""
    if answer is None:
        return None
    key = re.sub(r"\s+", "", normalize_answer(answer))
    return key or None


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample giving the most common answer (ties: the answer seen first), or
    None when no sample has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = answer_key(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[key] for key, n in counts.items() if n == best)


def cons_correct(answers_pk: Sequence[Sequence[str | None]],
                 correct_pk: Sequence[Sequence[bool]]) -> list[bool]:
    """Per prompt, whether its majority-voted answer is correct."""
    out = []
    for answers, correct in zip(answers_pk, correct_pk, strict=True):
        winner = majority_vote(answers)
        out.append(winner is not None and bool(correct[winner]))
    return out


def cons_at_k(answers_pk: Sequence[Sequence[str | None]],
              correct_pk: Sequence[Sequence[bool]]) -> float:
    """The fraction of prompts whose majority-voted answer is correct."""
    votes = cons_correct(answers_pk, correct_pk)
    return float(np.mean(votes)) if votes else 0.0


def proportion(flags: Sequence[bool], level: float = 0.95) -> dict:
    """{"value", "ci95"}: a fraction of independent units (prompts) with its Wilson interval."""
    flags = np.asarray(flags, dtype=np.float64)
    value = float(flags.mean()) if flags.size else 0.0
    return {"value": value, "ci95": list(wilson_interval(value, flags.size, level))}


def think_closed(completion: str) -> bool:
    """Format compliance of one completion: its think block is closed (R1-style templates open
    `<think>` in the prompt, so a `</think>` alone counts as opened and closed)."""
    return split_think(completion).closed


def length_stats(tokens: Sequence[int]) -> dict:
    """Mean, median and 90th percentile of completion lengths (tokens)."""
    t = np.asarray(tokens, dtype=np.float64)
    if not t.size:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0}
    return {"mean": float(t.mean()), "p50": float(np.percentile(t, 50)),
            "p90": float(np.percentile(t, 90))}


def by_difficulty(correct_pk, difficulties: Sequence, level: float = 0.95) -> dict:
    """{difficulty (as text): {"prompts", "pass@1", "ci95"}} over the prompts that carry one
    (None: no difficulty), ordered by difficulty."""
    c = np.asarray(correct_pk, dtype=np.float64)
    groups: dict = {}
    for i, d in enumerate(difficulties):
        if d is not None:
            groups.setdefault(d, []).append(i)
    out = {}
    for d in sorted(groups, key=_sort_key):
        rows = c[groups[d]]
        out[str(d)] = {"prompts": len(rows), "pass@1": pass_at_1(rows),
                       "ci95": list(pass_at_1_ci(rows, level))}
    return out


def _sort_key(value) -> tuple:
    """Numbers in numeric order, then text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def paired_difference(a: dict[str, float], b: dict[str, float], level: float = 0.95
                      ) -> tuple[float, float]:
    """Mean of per-prompt accuracy differences a - b over the prompts both have, and the
    half-width of its `level` interval (normal approximation; the pairing removes prompt difficulty
    from the noise)."""
    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys])
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, math.inf
    return float(d.mean()), float(z_value(level) * d.std(ddof=1) / math.sqrt(len(d)))
