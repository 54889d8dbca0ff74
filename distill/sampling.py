"""KV-cached batched generation: one compiled prefill, then a compiled decode loop.

Prompts of different lengths are left-padded into one [B, P] batch; padding slots are masked out of
attention and positions count real tokens only, so every row computes exactly what it would alone.
The decode loop is a `jax.lax.while_loop` (no Python dispatch per token) that stops when every row
has produced an end-of-sequence token or `max_new_tokens` is reached. With stop strings (and a
tokenizer) it runs in chunks of STOP_CHECK_EVERY tokens, between which the host decodes the rows'
text and ends those that contain a stop string.

Any model with `init_cache(batch, length)` and `forward_cached(tokens, positions, cache,
cache_index, kv_valid, last_only)` can be sampled from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Annotated, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field

from distill.config import Frozen
from distill.models.decoder import layer_stack_paths, unstack_layers

# The bounds of every sampling setting, declared once: the engine's SamplingParams, `distill
# generate`'s sampling table, `distill eval`'s protocol and the server's requests all use them.
Temperature = Annotated[float, Field(ge=0)]  # 0 is greedy
TopP = Annotated[float, Field(gt=0, le=1)]  # 1 keeps every token
TopK = Annotated[int, Field(ge=0)]  # 0 keeps every token
NewTokens = Annotated[int, Field(ge=1)]
Samples = Annotated[int, Field(ge=1)]  # completions per prompt
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # stored top-k log-probabilities (OpenAI's cap)


class SamplingFields(Frozen):
    """The settings every sampling table shares, declared once: the engine's `SamplingParams`,
    `distill generate`'s `sampling` and `distill eval`'s `protocol` add to these (and may change
    their defaults). `n` is the number of samples per prompt everywhere."""

    max_new_tokens: NewTokens = 256
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: Samples = 1
    seed: int = 0

    def params(self) -> SamplingParams:
        """The engine's settings this table describes (its other fields, such as the system
        prompt, left out): the one conversion from a config's sampling table."""
        fields = type(self).model_fields
        return SamplingParams(**{k: getattr(self, k) for k in SamplingParams.model_fields
                                 if k in fields})


class SamplingParams(SamplingFields):
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    Invalid values raise pydantic's ValidationError (a ValueError)."""

    stop: tuple[str, ...] = ()  # stop strings, applied to the decoded text
    logprobs: Annotated[int, Field(ge=0)] = 0  # also return each token's top-k log-probabilities

    def greedy(self) -> SamplingParams:
        """One sample at temperature 0, no filters, the same budget, seed and stop strings."""
        return self.model_copy(update={"temperature": 0.0, "top_p": 1.0, "top_k": 0, "n": 1})


class SystemPrompt(Frozen):
    """The system prompt a config asks every prompt with (None: none; R1 recommends none, all
    instructions in the user prompt). Part of a sampling table, not of the engine's settings."""

    system: str | None = None


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


@partial(jax.jit, static_argnums=(0,))
def _unstack(paths, tree):
    return unstack_layers(tree, paths)


class DecodeModel:
    """A model as `generate` decodes with it.

    `unroll` (default: on the CPU only) runs the decode steps over per-layer copies of the weights
    and KV cache (`distill.models.decoder.Unstacked`) instead of scanning the stacked layers: on
    XLA:CPU the scan copies each layer's weight and cache slice before reading it, as much as the
    step's own reads (SmolLM2, batch 16 x 64 tokens: 14.4 -> 11.7 s). Accelerators keep the scan
    and no second copy of the weights. The copies are made on first use and kept, so build one
    DecodeModel per model for repeated `generate` calls and drop it when the weights change.
    """

    def __init__(self, model, unroll: bool | None = None):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.unroll = jax.default_backend() == "cpu" if unroll is None else unroll
        self._unstacked = None

    def decode_state(self):
        """The state the decode steps read: unstacked layers when unrolling."""
        if not self.unroll:
            return self.state
        if self._unstacked is None:
            self._unstacked = _unstack(tuple(layer_stack_paths(self.model)), self.state)
        return self._unstacked


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
    logits, cache = model.forward_cached(tokens_bp, positions_bp, cache, 0, kv_valid_bs,
                                         last_only=True)
    return logits[:, -1], cache


def _logprob_record(logits_bv, tok_b, k: int):
    """(logprob of tok [B], top-k ids [B, k], top-k logprobs [B, k]) from raw logits."""
    logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, max(k, 1))
    return jnp.take_along_axis(logp, tok_b[:, None], axis=-1)[:, 0], top_ids, top_lp


class _DecodeState(NamedTuple):
    """The decode loop's carry; it survives between chunks (see `generate`)."""

    t: jax.Array  # index of the last token written to `out`
    cache: Any
    valid: jax.Array  # [B, S] cache slots holding real tokens
    out: jax.Array  # [B, max_new] generated tokens
    done: jax.Array  # [B] row finished (EOS, or a stop string seen by the host)
    count: jax.Array  # [B] tokens generated per row (EOS included)
    lps: tuple  # log-probability records: [B, max_new], [B, max_new, k], [B, max_new, k]


@partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _decode_start(params: SamplingParams, cache, first_logits_bv, kv_valid_bs, eos_ids, key):
    """Sample the first token from the prefill logits and set up the carry."""
    b, max_new, k = first_logits_bv.shape[0], params.max_new_tokens, max(params.logprobs, 1)
    tok0 = sample_token(first_logits_bv, jax.random.fold_in(key, 0), params)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok0)
    lps = (jnp.zeros((b, max_new)), jnp.zeros((b, max_new, k), jnp.int32), jnp.zeros((b, max_new, k)))
    if params.logprobs:
        rec = _logprob_record(first_logits_bv, tok0, k)
        lps = tuple(a.at[:, 0].set(r) for a, r in zip(lps, rec, strict=True))
    return _DecodeState(jnp.int32(0), cache, kv_valid_bs, out, jnp.isin(tok0, eos_ids),
                        jnp.ones((b,), jnp.int32), lps)


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode_chunk(graphdef, params: SamplingParams, state, carry: _DecodeState, lengths_b,
                  eos_ids, key, t_end):
    """Decode until token index `t_end` (or max_new_tokens), or until every row is done."""
    model = nnx.merge(graphdef, state)
    p = carry.valid.shape[1] - params.max_new_tokens  # slots before the first generated token
    stop_at = jnp.minimum(t_end, params.max_new_tokens - 1)

    def cond(c: _DecodeState):
        return (c.t < stop_at) & ~jnp.all(c.done)

    def body(c: _DecodeState):
        t, slot = c.t, p + c.t
        valid = c.valid.at[:, slot].set(True)
        tok = c.out[:, t][:, None]
        logits, cache = model.forward_cached(tok, (lengths_b + t)[:, None], c.cache, slot, valid)
        nxt = sample_token(logits[:, 0], jax.random.fold_in(key, t + 1), params)
        out = c.out.at[:, t + 1].set(jnp.where(c.done, 0, nxt))
        lps = c.lps
        if params.logprobs:
            rec = _logprob_record(logits[:, 0], nxt, max(params.logprobs, 1))
            lps = tuple(a.at[:, t + 1].set(r) for a, r in zip(lps, rec, strict=True))
        count = c.count + (~c.done).astype(jnp.int32)
        done = c.done | jnp.isin(nxt, eos_ids)
        return _DecodeState(t + 1, cache, valid, out, done, count, lps)

    return jax.lax.while_loop(cond, body, carry)


# With stop strings, the host looks at the text every this many tokens and ends the rows that
# contain one; without, the whole decode is one compiled loop.
STOP_CHECK_EVERY = 32


def _mark_stopped(carry: _DecodeState, tokenizer, stops: tuple[str, ...]) -> _DecodeState:
    done, out, count = np.array(carry.done), np.asarray(carry.out), np.asarray(carry.count)
    for j in np.flatnonzero(~done):
        text = tokenizer.decode(out[j, : count[j]].tolist())
        done[j] = any(stop in text for stop in stops)
    return carry._replace(done=jnp.asarray(done))


def _report_chunk(carry: _DecodeState, reported: np.ndarray, on_chunk):
    """Hand each row's tokens generated since `reported` (tokens per row) to `on_chunk`; returns
    the new counts and the rows `on_chunk` drops."""
    out, count = np.asarray(carry.out), np.asarray(carry.count)
    dropped = on_chunk([out[j, reported[j]: count[j]].tolist() for j in range(out.shape[0])])
    return count.astype(np.int64), dropped


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the config's, plus the tokenizer's EOS."""
    ids = list(model.config.eos_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
             eos_ids: Sequence[int] = (), tokenizer=None, pad_id: int = 0,
             on_chunk: Callable[[list[list[int]]], Sequence[int] | None] | None = None
             ) -> list[Completion]:
    """Generate for each prompt (token ids) `params.n` completions, in prompt-major order.

    model: a model, or a `DecodeModel` of one (which keeps its prepared weights across calls).

    on_chunk (for streaming): with it, decode runs in chunks of STOP_CHECK_EVERY tokens and after
    each one it is called on the host with every row's new token ids since the previous call (rows
    in the output's order; an end-of-sequence token included, tokens past a stop string too). It
    may return the indices of rows nobody wants any more (a client gone): they end there, and the
    call returns once every other row has.
    """
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

    dm = model if isinstance(model, DecodeModel) else DecodeModel(model)
    graphdef, state = dm.graphdef, dm.state
    cache = dm.model.init_cache(b, s_len)
    first, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(kv_valid), cache)
    if dm.unroll:  # the prefill is compute-bound and keeps the scan; decoding is not
        state = dm.decode_state()
        cache = _unstack(None, cache)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    key = jax.random.PRNGKey(params.seed)
    # the compiled steps never read seed, n or stop: leave them out of the static argument so a new
    # seed (e.g. one per request in a server) does not compile the decode loop again
    static = params.model_copy(update={"seed": 0, "n": 1, "stop": ()})
    carry = _decode_start(static, cache, first, jnp.asarray(kv_valid), eos, key)
    check = params.stop and tokenizer is not None
    chunk = STOP_CHECK_EVERY if check or on_chunk else params.max_new_tokens
    t_end, reported = chunk, np.zeros(b, np.int64)
    while True:
        carry = _decode_chunk(graphdef, static, state, carry, jnp.asarray(lengths), eos, key,
                              jnp.int32(t_end))
        if check:
            carry = _mark_stopped(carry, tokenizer, params.stop)
        if on_chunk is not None:
            reported, dropped = _report_chunk(carry, reported, on_chunk)
            if dropped:
                done = np.array(carry.done)
                done[list(dropped)] = True
                carry = carry._replace(done=jnp.asarray(done))
        if int(carry.t) >= params.max_new_tokens - 1 or bool(jnp.all(carry.done)):
            break
        t_end += chunk
    out, count = np.asarray(carry.out), np.asarray(carry.count)
    lps = [np.asarray(a) for a in carry.lps]
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
            # keep the tokens up to the one that completes the first stop string
            while ids and any(s in tokenizer.decode(ids[:-1]) for s in params.stop):
                ids = ids[:-1]
            text, reason = text[:cut], "stop"
    c = Completion(prompt_index, sample_index, ids, text, reason)
    if params.logprobs:
        n = len(ids)
        c.token_logprobs = lps[0][:n].tolist()
        c.top_ids = lps[1][:n].tolist()
        c.top_logprobs = lps[2][:n].tolist()
    return c
