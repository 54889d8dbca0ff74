"""A model's log-probabilities on given tokens (teacher scoring): for each (prompt, completion) pair,
log q(c_t | prompt, c_<t) at temperature 1 for every completion token, and optionally the top-k
entries or the whole distribution at each of those positions.

Rows (prompt + completion) run through one jitted full-sequence forward, right-padded to buckets
of powers of two in rows and in length, so a run compiles a bounded number of programs. Padding
sits after every real token and attention is causal, so a row's numbers do not depend on what
else is in its batch or how long the padding is; the log-softmax is taken in float32.

Dimension alphabet: B rows, T tokens, V vocab, K top entries kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.errors import DistillError
from distill.inference.engine import pow2_at_least

MIN_LENGTH_BUCKET = 16  # the shortest padded row: fewer tiny programs for short sequences
FULL = -1  # the program's `k` for the whole vocabulary


@dataclasses.dataclass
class TokenScores:
    """A scorer's answer for one sequence, per completion token, in the scorer's tokenization,
    at temperature 1 (the teacher's own distribution, whatever anybody sampled at)."""

    logprobs: np.ndarray  # float32 [C]: log q(c_t | prompt, c_<t)
    top_ids: np.ndarray | None = None  # int32 [C, K] (K = vocabulary: the full distribution)
    top_logprobs: np.ndarray | None = None  # float32 [C, K]
    ranks: np.ndarray | None = None  # int32 [C]: entries at least as likely as c_t (vLLM's rank)


@partial(jax.jit, static_argnames=("graphdef", "k", "ranks"))
def _score(graphdef, weights, tokens_bt, *, k: int, ranks: bool):
    """Per position t: the log-prob of token t + 1 [B, T], with `ranks` its rank [B, T] and, for
    k > 0, the top-k ids and log-probs [B, T, K]; for k == FULL, the whole log-softmax [B, T, V]."""
    model = nnx.merge(graphdef, weights)
    logp_btv = jax.nn.log_softmax(model(tokens_bt).astype(jnp.float32), axis=-1)
    next_bt = jnp.concatenate([tokens_bt[:, 1:], jnp.zeros_like(tokens_bt[:, :1])], axis=1)
    taken_bt = jnp.take_along_axis(logp_btv, next_bt[..., None], axis=-1)[..., 0]
    rank_bt = jnp.sum(logp_btv >= taken_bt[..., None], axis=-1, dtype=jnp.int32) if ranks else None
    if k == 0:
        return taken_bt, rank_bt, None, None
    if k == FULL:
        return taken_bt, rank_bt, None, logp_btv
    top_lp, top_ids = jax.lax.top_k(logp_btv, k)
    return taken_bt, rank_bt, top_ids.astype(jnp.int32), top_lp


def score_sequences(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    top_k: int | None = 0, *, batch_rows: int = 8,
                    ranks: bool = False) -> list[TokenScores]:
    """The model's log-probabilities on each completion given its prompt (one `TokenScores` per
    pair, in order). top_k 0: the completion tokens' log-probs only; k > 0: the top-k entries at
    each completion position too; None: the full vocabulary (top_ids = arange(V)).

    `model(tokens_bt)` must give float32 logits [B, T, V] (any distill decoder, dense or MoE).
    Rows are batched `batch_rows` at a time, longest first. `ranks` adds each completion token's
    rank (what vLLM's prompt_logprobs report). A prompt must have a token (the
    first completion token is predicted from it); a row longer than the model's context is a
    DistillError.
    """
    if len(prompts) != len(completions):
        raise DistillError(f"{len(prompts)} prompts but {len(completions)} completions to score")
    vocab = model.config.vocab_size
    k = FULL if top_k is None else int(top_k)
    if k < FULL or k > vocab:
        raise DistillError(f"top_k {top_k}: must be 0, up to the vocabulary ({vocab}), or None")
    rows = [[*map(int, p), *map(int, c)] for p, c in zip(prompts, completions, strict=True)]
    context = model.config.max_position_embeddings
    for i, (p, row) in enumerate(zip(prompts, rows, strict=True)):
        if not len(p):
            raise DistillError(f"sequence {i}: an empty prompt (scoring needs a first token)")
        if len(row) > context:
            raise DistillError(f"sequence {i}: {len(row)} tokens, past the model's context "
                               f"({context})")
    graphdef, weights = nnx.split(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[TokenScores | None] = [None] * len(rows)
    for start in range(0, len(order), batch_rows):
        group = order[start:start + batch_rows]
        b = min(pow2_at_least(len(group)), batch_rows)
        # the context caps the bucket (a context that is no power of two is its own bucket)
        t = min(pow2_at_least(max(len(rows[group[0]]), MIN_LENGTH_BUCKET)), context)
        tokens = np.zeros((b, t), np.int32)
        for r, i in enumerate(group):
            tokens[r, :len(rows[i])] = rows[i]
        taken, rank, top_ids, top_lp = jax.device_get(
            _score(graphdef, weights, jnp.asarray(tokens), k=k, ranks=ranks))
        for r, i in enumerate(group):
            first, stop = len(prompts[i]) - 1, len(rows[i]) - 1  # positions predicting c_0..c_C-1
            out[i] = TokenScores(np.asarray(taken[r, first:stop], np.float32),
                                 *_top(top_ids, top_lp, r, first, stop, k),
                                 None if rank is None else np.asarray(rank[r, first:stop], np.int32))
    return out  # type: ignore[return-value]


def _top(top_ids, top_lp, r: int, first: int, stop: int, k: int):
    """(top_ids [C, K] int32, top_logprobs [C, K] float32) of row r, or (None, None)."""
    if k == 0:
        return None, None
    lps = np.asarray(top_lp[r, first:stop], np.float32)
    if k == FULL:
        return np.broadcast_to(np.arange(lps.shape[1], dtype=np.int32), lps.shape).copy(), lps
    return np.asarray(top_ids[r, first:stop], np.int32), lps
