"""KV-cached batched generation: one compiled prefill, then a compiled decode loop.

Prompts of different lengths are left-padded into one [B, P] batch; padding slots are masked out of
attention and positions count real tokens only, so every row computes exactly what it would alone.
The decode loop is a `jax.lax.while_loop` (no Python dispatch per token) that stops when every row
has produced an end-of-sequence token or `max_new_tokens` is reached.

Any model with `init_cache(batch, length)` and `forward_cached(tokens, positions, cache,
cache_index, kv_valid)` can be sampled from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1  # samples per prompt
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings, applied to the decoded text
    logprobs: int = 0  # also return the top-k log-probabilities of every generated token

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if (self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.n < 1
                or self.logprobs < 0):
            raise ValueError(f"invalid sampling parameters {self}")


@dataclasses.dataclass
class Completion:
    """One generated sequence: its new token ids, text (when a tokenizer was given) and why it ended."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    # With SamplingParams.logprobs = k: per generated token, its own log-probability and the top-k
    # (ids, log-probabilities) under the model's distribution (temperature 1, before filtering).
    token_logprobs: list[float] | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def filter_logits(logits_bv: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed tokens get -inf."""
    logits = logits_bv.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < top_p  # the smallest set whose mass reaches top_p (always >= 1 token)
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits_bv, key, params: SamplingParams) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if params.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_bv, params.temperature, params.top_k, params.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(5,))
def _prefill(graphdef, state, tokens_bp, positions_bp, kv_valid_bs, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward_cached(tokens_bp, positions_bp, cache, 0, kv_valid_bs)
    return logits[:, -1], cache


def _logprob_record(logits_bv, tok_b, k: int):
    """(logprob of tok [B], top-k ids [B, k], top-k logprobs [B, k]) from raw logits."""
    logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, max(k, 1))
    return jnp.take_along_axis(logp, tok_b[:, None], axis=-1)[:, 0], top_ids, top_lp


@partial(jax.jit, static_argnums=(0, 1))
def _decode(graphdef, params: SamplingParams, state, cache, first_logits_bv, kv_valid_bs,
            lengths_b, eos_ids, key):
    """The whole decode loop. Returns tokens [B, max_new], the count generated per row, and the
    log-probability records ([B, max_new], [B, max_new, k], [B, max_new, k]; k >= 1)."""
    model = nnx.merge(graphdef, state)
    b = first_logits_bv.shape[0]
    p = kv_valid_bs.shape[1] - params.max_new_tokens  # slots before the first generated token
    max_new, k = params.max_new_tokens, max(params.logprobs, 1)
    tok0 = sample_token(first_logits_bv, jax.random.fold_in(key, 0), params)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok0)
    lps = (jnp.zeros((b, max_new)), jnp.zeros((b, max_new, k), jnp.int32), jnp.zeros((b, max_new, k)))
    if params.logprobs:
        lps = tuple(a.at[:, 0].set(r) for a, r in zip(lps, _logprob_record(first_logits_bv, tok0, k),
                                                      strict=True))
    done = jnp.isin(tok0, eos_ids)
    count = jnp.ones((b,), jnp.int32)

    def cond(carry):
        t, _, _, _, done, _, _ = carry
        return (t < max_new - 1) & ~jnp.all(done)

    def body(carry):
        t, cache, valid, out, done, count, lps = carry
        slot = p + t
        valid = valid.at[:, slot].set(True)
        tok = out[:, t][:, None]
        logits, cache = model.forward_cached(tok, (lengths_b + t)[:, None], cache, slot, valid)
        nxt = sample_token(logits[:, 0], jax.random.fold_in(key, t + 1), params)
        out = out.at[:, t + 1].set(jnp.where(done, 0, nxt))
        if params.logprobs:
            rec = _logprob_record(logits[:, 0], nxt, k)
            lps = tuple(a.at[:, t + 1].set(r) for a, r in zip(lps, rec, strict=True))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos_ids)
        return t + 1, cache, valid, out, done, count, lps

    carry = (jnp.int32(0), cache, kv_valid_bs, out, done, count, lps)
    _, _, _, out, _, count, lps = jax.lax.while_loop(cond, body, carry)
    return out, count, lps


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
             eos_ids: Sequence[int] = (), tokenizer=None, pad_id: int = 0) -> list[Completion]:
    """Generate for each prompt (token ids) `params.n` completions, in prompt-major order."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    rows = [(i, s, list(p)) for i, p in enumerate(prompts) for s in range(params.n)]
    b = len(rows)
    p_len = _round_up(max(len(r[2]) for r in rows), 16)  # bucketed: fewer recompiles
    s_len = p_len + params.max_new_tokens
    tokens = np.full((b, p_len), pad_id, np.int32)
    lengths = np.array([len(r[2]) for r in rows], np.int32)
    for j, (_, _, ids) in enumerate(rows):
        tokens[j, p_len - len(ids):] = ids
    slots = np.arange(p_len)
    positions = np.maximum(slots[None, :] - (p_len - lengths[:, None]), 0).astype(np.int32)
    kv_valid = np.zeros((b, s_len), bool)
    kv_valid[:, :p_len] = slots[None, :] >= (p_len - lengths[:, None])

    graphdef, state = nnx.split(model)
    cache = model.init_cache(b, s_len)
    first, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(kv_valid), cache)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    out, count, lps = _decode(graphdef, params, state, cache, first, jnp.asarray(kv_valid),
                              jnp.asarray(lengths), eos, jax.random.PRNGKey(params.seed))
    out, count, lps = np.asarray(out), np.asarray(count), [np.asarray(a) for a in lps]
    return [_finish(rows[j][0], rows[j][1], out[j, : count[j]].tolist(), [a[j] for a in lps],
                    set(eos_ids), params, tokenizer) for j in range(b)]


def _finish(prompt_index, sample_index, ids, lps, eos, params, tokenizer) -> Completion:
    reason = "stop" if ids and ids[-1] in eos else "length"
    if reason == "stop":
        ids = ids[:-1]
    text = tokenizer.decode(ids) if tokenizer is not None else None
    if text is not None and params.stop:
        cut = min((text.find(s) for s in params.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
    c = Completion(prompt_index, sample_index, ids, text, reason)
    if params.logprobs:
        n = len(ids)
        c.token_logprobs = lps[0][:n].tolist()
        c.top_ids = lps[1][:n].tolist()
        c.top_logprobs = lps[2][:n].tolist()
    return c
