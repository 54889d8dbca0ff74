"""The engine's compiled programs: the first chunk of several prompts, a later chunk of one, several decode steps over every
slot, a slot's cache copied to another. Each is a pure function of the weights (an argument, so
`Engine.set_weights` swaps them without a recompile), the cache (donated: updated in place) and
small per-slot arrays; the only static arguments are shapes from a fixed set of buckets.

The cache's attention reads are behind two functions, `window` and `put_new`: a decode chunk
slices every slot's cache to a window of W entries (W a bucket over the longest sequence it
serves), runs on the window and writes back the entries it added. A paged or ragged attention kernel would replace this seam by one
that takes slot ids and lengths.

Dimension alphabet: S slots (the batch), W cache window, C prompt-chunk length, K decode steps per
host visit, V vocab, J top log-probabilities kept.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models.decoder import unstack_layers
from distill.models.layers import read_slots, write_slots
from distill.sampling import row_uniform, sample_rows

TOP_LOGPROBS = 20  # the most log-probabilities a request may ask for per token (OpenAI's cap)


class Layout(NamedTuple):
    """Where a cache leaf keeps its slots (batch) and its sequence: [L, S, ...] stacked, or one
    layer's [S, ...] when the decode runs over unstacked layers (`distill.models.decoder`)."""

    batch_axis: int
    seq_axis: int

    @classmethod
    def of(cls, model, unstacked: bool) -> Layout:
        lead = 0 if unstacked else 1
        return cls(lead, model.cache_slot_axis + lead)


class SlotArrays(NamedTuple):
    """Per-slot decode state [S], device-side; the host keeps the authoritative copy."""

    lengths: jax.Array  # int32: tokens in the slot's cache
    last: jax.Array  # int32: the next token to feed (the last prompt token, then each sample)
    active: jax.Array  # bool: decoding
    budget: jax.Array  # int32: tokens it may still generate
    count: jax.Array  # int32: tokens generated so far (its random stream's step)
    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32, 1 = off
    key: jax.Array  # uint32 [S, 2]: the sample's own PRNG key


class Emitted(NamedTuple):
    """What a decode chunk hands to the host, [K, S] (and [K, S, J] for the top entries)."""

    tokens: jax.Array
    valid: jax.Array  # the slot was active at that step: the token is real
    logprob: jax.Array | None
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None


def window(cache, layout: Layout, w: int):
    """Every slot's first `w` cache entries."""
    return jax.tree.map(lambda c: jax.lax.slice_in_dim(c, 0, w, axis=layout.seq_axis), cache)


def put_new(cache, win, start_s, t: int, layout: Layout):
    """`cache` with each slot's `t` entries from `start_s` [S] on taken from its window `win`
    (only what a decode chunk wrote goes back; in place when `cache` is donated)."""
    def put(c, u):
        def one(c, u):  # one layer: [S, ...]
            return write_slots(c, read_slots(u, start_s, t, layout.seq_axis - layout.batch_axis),
                               start_s, layout.seq_axis - layout.batch_axis)

        return one(c, u) if layout.batch_axis == 0 else jax.vmap(one)(c, u)

    return jax.tree.map(put, cache, win)


def _row(cache, layout: Layout, slot, w: int):
    """Slot `slot`'s first `w` entries, batch kept (size 1)."""
    return jax.tree.map(
        lambda c: jax.lax.slice_in_dim(
            jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=layout.batch_axis), 0, w,
            axis=layout.seq_axis), cache)


def _put_row(cache, row, layout: Layout, slot):
    def put(c, u):
        start = tuple(slot if a == layout.batch_axis else 0 for a in range(c.ndim))
        return jax.lax.dynamic_update_slice(c, u, start)

    return jax.tree.map(put, cache, row)


@partial(jax.jit, static_argnames=("graphdef", "layout"), donate_argnames=("cache",))
def prefill_first(graphdef, weights, cache, slot_p, tokens_pc, n_real_p, *, layout: Layout):
    """The first chunk of P prompts at once: tokens [P, C] (row p's first `n_real_p[p]` real)
    run on a fresh cache of C entries, which is then written into slots `slot_p` [P] at entries
    [0, C). Nothing is read from the big cache, so no window is gathered. Padding rows repeat a
    real row (same slot, same tokens: the same values written twice)."""
    model = nnx.merge(graphdef, weights)
    p, c = tokens_pc.shape
    fresh = model.init_cache(p, c, jax.tree.leaves(cache)[0].dtype)
    if layout.batch_axis == 0:
        fresh = unstack_layers(fresh)
    positions = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (p, c))
    valid = jnp.arange(c)[None] < n_real_p[:, None]
    fresh = model.fill_cache(tokens_pc, positions, fresh, 0, valid)

    def put(big, new):
        index = [slice(None)] * big.ndim
        index[layout.batch_axis], index[layout.seq_axis] = slot_p, slice(0, c)
        return big.at[tuple(index)].set(new.astype(big.dtype))

    return jax.tree.map(put, cache, fresh)


@partial(jax.jit, static_argnames=("graphdef", "layout", "w"), donate_argnames=("cache",))
def prefill(graphdef, weights, cache, slot, tokens_1c, start, n_real, *, layout: Layout, w: int):
    """A later chunk of one prompt: tokens [1, C] (the first `n_real` real, the rest padding)
    into slot `slot`'s cache from entry `start` on, attending to its earlier entries through a
    window of `w` >= start + C."""
    model = nnx.merge(graphdef, weights)
    c = tokens_1c.shape[1]
    row = _row(cache, layout, slot, w)
    positions = (start + jnp.arange(c, dtype=jnp.int32))[None]
    valid = (jnp.arange(w) < start + n_real)[None]
    row = model.fill_cache(tokens_1c, positions, row, start, valid)
    return _put_row(cache, row, layout, slot)


@partial(jax.jit, static_argnames=("layout",), donate_argnames=("cache",))
def copy_slot(cache, src, dst, *, layout: Layout):
    """Slot `dst`'s cache becomes slot `src`'s (a prompt prefilled once for n samples)."""
    total = jax.tree.leaves(cache)[0].shape[layout.seq_axis]
    return _put_row(cache, _row(cache, layout, src, total), layout, dst)


def _logprob_record(logits_sv, tok_s, j: int):
    """(log-probability of tok [S], top-j ids [S, J], top-j log-probabilities [S, J])."""
    logp = jax.nn.log_softmax(logits_sv.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, j)
    return jnp.take_along_axis(logp, tok_s[:, None], axis=-1)[:, 0], top_ids, top_lp


@partial(jax.jit, static_argnames=("graphdef", "layout", "w", "steps", "logprobs"),
         donate_argnames=("cache",))
def decode(graphdef, weights, cache, slots: SlotArrays, eos_ids, *, layout: Layout, w: int,
           steps: int, logprobs: bool) -> tuple[Any, SlotArrays, Emitted]:
    """`steps` decode steps over every slot on a window of `w` cache entries (w >= the longest
    occupied slot's length + steps). An active slot feeds its `last` token, samples the next with
    its own settings and random stream, and stops at an end-of-sequence id or its budget; other
    slots compute and write nothing that is read."""
    model = nnx.merge(graphdef, weights)
    slots_w = jnp.arange(w, dtype=jnp.int32)

    def step(carry, _):
        win, s = carry
        pos = jnp.minimum(s.lengths, w - 1)
        valid = slots_w[None] <= pos[:, None]
        logits, win = model.forward_cached(s.last[:, None], pos[:, None], win, pos, valid)
        logits = logits[:, 0]
        tok = sample_rows(logits, row_uniform(s.key, s.count), s.temperature, s.top_k, s.top_p)
        live = s.active.astype(jnp.int32)
        budget = s.budget - live
        done = jnp.isin(tok, eos_ids) | (budget <= 0)
        rec = _logprob_record(logits, tok, TOP_LOGPROBS) if logprobs else (None, None, None)
        s = s._replace(lengths=s.lengths + live, count=s.count + live, budget=budget,
                       last=jnp.where(s.active, tok, s.last), active=s.active & ~done)
        return (win, s), Emitted(tok, live > 0, *rec)

    start = slots.lengths
    (win, slots), out = jax.lax.scan(step, (window(cache, layout, w), slots), None, length=steps)
    return put_new(cache, win, start, steps, layout), slots, out
