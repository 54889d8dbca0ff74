"""The pieces of a POST /v1/completions answer in vLLM's shape: the prompt tokens' log-probabilities
(`PromptScorer`, computed with `distill.inference.score_sequences` on the serving model, beside
the engine's slots) and the completion's (the legacy completions `logprobs` object).

`prompt_logprobs` (vLLM's `CompletionResponseChoice.prompt_logprobs`): one entry per prompt token,
null for the first, then {"<token id>": {"logprob", "rank", "decoded_token"}} holding the top k and
the prompt token itself (with its rank, 1 + the tokens more likely); k = -1 gives every token.
"""

from __future__ import annotations

import threading

import numpy as np

from distill.inference import Completion, score_sequences
from distill.inference.programs import TOP_LOGPROBS
from distill.serve.protocol import MIN_LOGPROB


class PromptScorer:
    """The serving model's log-probabilities on a request's prompt tokens. One scoring at a time
    (a lock), on the caller's thread, beside the engine's worker: both only read the weights."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._lock = threading.Lock()
        self._pieces: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        """A token's decoded text (cached: a whole-vocabulary answer names every token)."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id])
        return text

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict | None]:
        """vLLM's prompt_logprobs of `ids` with the top `k` entries (-1: all) per position."""
        if len(ids) < 2:
            return [None] * len(ids)
        # one program for every k up to OpenAI's cap (its top entries sliced), not one per k
        asked = None if k == -1 else TOP_LOGPROBS if 0 < k <= TOP_LOGPROBS else k
        with self._lock:
            [s] = score_sequences(self.model, [ids[:1]], [ids[1:]], asked, ranks=True)
        rows: list[dict | None] = [None]
        for t, token in enumerate(ids[1:]):
            entries: dict[int, tuple[float, int]] = {}
            if s.top_ids is not None:
                order = np.argsort(-s.top_logprobs[t], kind="stable")[:None if k == -1 else k]
                for rank, j in enumerate(order, 1):
                    entries[int(s.top_ids[t, j])] = (float(s.top_logprobs[t, j]), rank)
            entries[int(token)] = (float(s.logprobs[t]), int(s.ranks[t]))  # vLLM's rank for it
            rows.append({str(i): {"logprob": max(lp, MIN_LOGPROB), "rank": rank,
                                  "decoded_token": self.piece(i)}
                         for i, (lp, rank) in entries.items()})
        return rows

    def completion_logprobs(self, c: Completion, k: int, as_ids: bool) -> dict:
        """The legacy completions `logprobs` of a choice: tokens, their log-probabilities, their
        text offsets and, per token, the top k and the token itself as {token: logprob}."""
        def name(i: int) -> str:
            return f"token_id:{i}" if as_ids else self.piece(i)

        offsets, at = [], 0
        for i in c.token_ids:
            offsets.append(at)
            at += len(self.piece(i))
        tops = []
        for token, lp, ids, lps in zip(c.token_ids, c.token_logprobs, c.top_ids, c.top_logprobs,
                                       strict=True):
            top = {name(i): max(v, MIN_LOGPROB) for i, v in zip(ids[:k], lps[:k], strict=True)}
            top.setdefault(name(token), max(lp, MIN_LOGPROB))
            tops.append(top)
        return {"text_offset": offsets,
                "token_logprobs": [max(lp, MIN_LOGPROB) for lp in c.token_logprobs],
                "tokens": [name(i) for i in c.token_ids], "top_logprobs": tops}
