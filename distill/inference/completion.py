"""What the engine returns for one sample: `Completion`, built from its tokens by `completion_of`
(end-of-sequence id removed, text cut at the first stop string, the asked-for log-probabilities)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Completion:
    """One generated sequence: its new token ids, text (when a tokenizer was given) and why it ended."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string), "length" or "cancelled"
    # With SamplingParams.logprobs = k: per generated token, its own log-probability and the top-k
    # (ids, log-probabilities) under the model's distribution (temperature 1, before filtering).
    token_logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def completion_of(prompt_index: int, sample_index: int, ids: list[int], lps: list[tuple] | None,
                  k: int, eos: set[int], stops: tuple[str, ...], tokenizer,
                  cancelled: bool = False) -> Completion:
    """The completion of a sample that generated `ids` (an end-of-sequence id last if it ended
    so), with `lps` its per-token (log-probability, top ids, top log-probabilities) records."""
    reason = "stop" if ids and ids[-1] in eos else "length"
    if reason == "stop":
        ids = ids[:-1]
    text = tokenizer.decode(ids) if tokenizer is not None else None
    if text is not None and stops:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            # keep the tokens up to the one that completes the first stop string
            while ids and any(s in tokenizer.decode(ids[:-1]) for s in stops):
                ids = ids[:-1]
            text, reason = text[:cut], "stop"
    if cancelled and reason == "length":
        reason = "cancelled"
    c = Completion(prompt_index, sample_index, ids, text, reason)
    if k and lps is not None:
        n = len(ids)
        c.token_logprobs = [float(r[0]) for r in lps[:n]]
        c.top_ids = [[int(t) for t in r[1][:k]] for r in lps[:n]]
        c.top_logprobs = [[float(x) for x in r[2][:k]] for r in lps[:n]]
    return c
