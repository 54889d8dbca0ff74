"""How to sample: `SamplingParams`, the one validated sampling-settings type (the bounds every
sampling table shares are declared here once), and the per-row sampling functions the inference
engine's programs call: `sample_rows` (temperature, top-k, top-p per row, greedy rows argmax, no
vocabulary sort), `row_uniform` and `request_key` (each sample's own random stream), and
`sample_seed`, the seed of one sample of one prompt that every backend asks with.

Models sample through the inference engine (`distill.inference`), which takes these settings per
request as data.
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from distill.config import Frozen

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




# Per-row sampling as data: every row carries its own temperature, top-k, top-p and random stream,
# so one compiled program samples any mix of settings. No sort of the vocabulary: each row's cut is
# found by bisection over the float32 values' order (as int32 keys), and a row keeps every token
# whose value reaches its cut, ties included.
#
# A pass over [B, V] costs ~0.45 ms on this CPU at B=16, V=49152, and a bisection takes up to 32,
# so the search runs on few tokens where it can, each path exact where it says so (`_cuts`):
# 1. the _GATHER blocks of _BLOCK tokens with the largest maxima, where the kept tokens lie there
#    (SmolLM2 at temperature 0.6, top-p 0.95 keeps at most ~120 tokens: always, ~3 ms a step);
# 2. else a band: _NARROW_STEPS whole-row steps, then the blocks holding the band (temperature 1,
#    top-p 0.95: ~20% of rows, ~12 ms);
# 3. else the whole rows (the last resort; never needed on SmolLM2's logits).
_MIN_TEMPERATURE = 1e-6  # a positive temperature below this counts as this (no inf, no nan)
_KEEP_ALL = jnp.iinfo(jnp.int32).min  # the cut of a row without filters: below every key
_BLOCK = 64
_GATHER = 64
_NARROW_STEPS = 12  # SmolLM2 at temperature 1: the band then holds <= 48 tokens


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values are (-0.0 and 0.0 share the key 0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(x == 0, 0, jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits))


def _key_values(key: jax.Array) -> jax.Array:
    """The float32 values of order keys (`_order_keys`' inverse)."""
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def _bisect_step(pred, lo_b, hi_b, by_value: bool):
    """One bisection step of [lo, hi] (pred(lo) true, the answer in [lo, hi]): at the midpoint of
    the keys, or of the values where that lies strictly inside (fewer steps on spread values)."""
    mid = (lo_b >> 1) + (hi_b >> 1) + ((lo_b | hi_b) & 1)  # ceil((lo + hi) / 2) without overflow
    if by_value:
        vmid = _order_keys(_key_values(lo_b) / 2 + _key_values(hi_b) / 2)
        mid = jnp.where((vmid > lo_b) & (vmid <= hi_b), vmid, mid)
    ok, active = pred(mid), lo_b < hi_b
    return jnp.where(active & ok, mid, lo_b), jnp.where(active & ~ok, mid - 1, hi_b)


def _largest_true(pred, lo_b: jax.Array, hi_b: jax.Array) -> jax.Array:
    """Per row, the largest int32 t in [lo, hi] with pred(t) true (pred non-increasing in t), or lo
    where none is: integer bisection, exact after 32 steps. A fixed count: a convergence test may
    cost a device-to-host copy per step on GPUs, and stopping early saved nothing on this CPU."""
    return jax.lax.fori_loop(0, 32, lambda i, c: _bisect_step(pred, *c, by_value=False),
                             (lo_b, hi_b))[0]


def _mass_at_or_above(key_bn, w_bn, t_b):
    """Per row, the total weight of the entries whose key is >= t (w: an array or a scalar)."""
    return jnp.sum(jnp.where(key_bn >= t_b[:, None], w_bn, 0.0), -1)


def _search(key_bn, w_bn, target_b, lo_b, hi_b, on_b, above_b=0.0):
    """Per row, the largest key t in [lo, hi] whose weight at or above it (plus `above`) reaches
    target; _KEEP_ALL for rows not `on`."""
    return _largest_true(lambda t: above_b + _mass_at_or_above(key_bn, w_bn, t) >= target_b,
                         jnp.where(on_b, lo_b, _KEEP_ALL), jnp.where(on_b, hi_b, _KEEP_ALL))


def _two_cuts(search, mass_at_or_above, top_k_b, top_p_b, z_b, lo_b, hi_b):
    """(cut, ok) per row: top-k (count(key >= cut) >= k), then top-p on the top-k-filtered
    distribution (its mass at or above the cut >= top_p * its total; `z_b`: the whole row's), in
    [lo, hi]. `search(mass, target, lo, hi, on)` -> (cut, ok) counts tokens, or with `mass` sums
    their exp(x - row max); `mass_at_or_above(t)`: the row's mass of keys >= t."""
    k_on, p_on = top_k_b > 0, top_p_b < 1.0
    kth, ok_k = search(False, top_k_b.astype(jnp.float32), lo_b, hi_b, k_on)
    z_kept = jax.lax.cond(jnp.any(k_on), lambda: jnp.where(k_on, mass_at_or_above(kth), z_b),
                          lambda: z_b)
    cut, ok_p = search(True, top_p_b * z_kept, jnp.maximum(lo_b, kth), hi_b, p_on)
    return jnp.where(p_on, cut, kth), ok_k & ok_p


def _gather_blocks(score_bv, arrays):
    """The _GATHER blocks (of _BLOCK tokens) with the largest scores, each array's entries there
    [B, _GATHER * _BLOCK], and the keys of the best score and of the best score outside them."""
    b, v = score_bv.shape
    # top-k over the blocks' maxima, not the tokens; on floats (XLA:CPU's int32 top_k is 15x
    # slower), behind a barrier (without, XLA:CPU turns it into a full sort to feed the gathers)
    top_bg, blocks_bg = jax.lax.optimization_barrier(
        jax.lax.top_k(jnp.max(score_bv.reshape(b, v // _BLOCK, _BLOCK), -1), _GATHER + 1))
    take = lambda a: jnp.take_along_axis(  # noqa: E731
        a.reshape(b, v // _BLOCK, _BLOCK), blocks_bg[:, :-1, None], 1)
    return [take(a).reshape(b, -1) for a in arrays], _order_keys(top_bg[:, 0]), _order_keys(
        top_bg[:, -1])


def _cut_top_blocks(x_bv, key_bv, e_bv, top_k_b, top_p_b, z_b):
    """(cut, ok): the cuts found on the _GATHER blocks with the largest maxima only; exact where
    ok (the cut lies above every key outside them, so they hold every token at or above it)."""
    (gk, ge), top_b, outside_b = _gather_blocks(x_bv, (key_bv, e_bv))

    def search(mass, target_b, lo_b, hi_b, on_b):
        cut = _search(gk, ge if mass else 1.0, target_b, lo_b, hi_b, on_b)
        return cut, ~on_b | (cut > outside_b)

    return _two_cuts(search, partial(_mass_at_or_above, gk, ge), top_k_b, top_p_b, z_b,
                     outside_b, top_b)


def _banded_search(x_bv, key_bv, w, target_b, lo_b, hi_b, on_b):
    """(cut, ok) of `_search` over whole rows: _NARROW_STEPS bisection steps over them narrow
    [lo, hi] to a band, then the search ends on the _GATHER blocks holding most of the band's keys
    (the weight above the band counted whole); exact where ok (no key of the band outside those
    blocks lies at or above the cut)."""
    pred = lambda t: _mass_at_or_above(key_bv, w, t) >= target_b  # noqa: E731
    lo_b, hi_b = jax.lax.fori_loop(0, _NARROW_STEPS, lambda i, c: _bisect_step(
        pred, *c, by_value=True), (jnp.where(on_b, lo_b, _KEEP_ALL), jnp.where(on_b, hi_b,
                                                                                _KEEP_ALL)))
    band_bv = (key_bv >= lo_b[:, None]) & (key_bv <= hi_b[:, None])
    (gk, gw), _, outside_b = _gather_blocks(jnp.where(band_bv, x_bv, -jnp.inf),
                                            (key_bv, jnp.where(band_bv, w, 0.0)))
    above_b = _mass_at_or_above(key_bv, w, hi_b + 1)
    cut = _search(gk, gw, target_b, lo_b, hi_b, on_b, above_b)
    return cut, ~on_b | (cut > outside_b)


def _cut_banded(x_bv, key_bv, e_bv, top_k_b, top_p_b, z_b):
    """(cut, ok): the cuts found by `_banded_search` over the whole rows."""

    def search(mass, target_b, lo_b, hi_b, on_b):
        return jax.lax.cond(
            jnp.any(on_b), partial(_banded_search, x_bv, key_bv, e_bv if mass else 1.0, target_b,
                                   lo_b, hi_b, on_b),
            lambda: (jnp.full(on_b.shape, _KEEP_ALL), jnp.ones(on_b.shape, bool)))

    return _two_cuts(search, partial(_mass_at_or_above, key_bv, e_bv), top_k_b, top_p_b, z_b,
                     jnp.min(key_bv, -1), jnp.max(key_bv, -1))


def _cut_whole(key_bv, e_bv, top_k_b, top_p_b, z_b):
    """The cuts found by bisection over the whole rows (the last resort; exact)."""

    def search(mass, target_b, lo_b, hi_b, on_b):
        return _search(key_bv, e_bv if mass else 1.0, target_b, lo_b, hi_b, on_b), True

    return _two_cuts(search, partial(_mass_at_or_above, key_bv, e_bv), top_k_b, top_p_b, z_b,
                     jnp.min(key_bv, -1), jnp.max(key_bv, -1))[0]


def _first_exact(cut_b, ok_b, fallback):
    """cut where ok; the rest from `fallback()`, run only when some row needs it."""
    return jax.lax.cond(jnp.all(ok_b), lambda: cut_b, lambda: jnp.where(ok_b, cut_b, fallback()))


def _cuts(x_bv, key_bv, e_bv, top_k_b, top_p_b):
    """Each row's cut key: the row keeps the tokens whose key is >= it (_KEEP_ALL: no filter).
    Each row takes the first exact answer of: the top blocks, the banded blocks, the whole row."""
    v = key_bv.shape[1]
    args = (key_bv, e_bv, jnp.where(top_k_b >= v, 0, top_k_b), top_p_b,  # k >= V keeps all
            jnp.sum(e_bv, -1))
    if v % _BLOCK or v // _BLOCK <= 2 * _GATHER:  # a small vocabulary: the whole rows only
        return _cut_whole(*args)
    whole = partial(_cut_whole, *args)
    banded = lambda: _first_exact(*_cut_banded(x_bv, *args), whole)  # noqa: E731
    return _first_exact(*_cut_top_blocks(x_bv, *args), banded)


class _Filtered(NamedTuple):
    x_bv: jax.Array  # logits / temperature (greedy rows: / 1)
    key_bv: jax.Array  # their order keys
    e_bv: jax.Array  # exp(x - row max)
    max_key_b: jax.Array  # the key of the row's largest value
    cut_b: jax.Array  # the row keeps the tokens whose key is >= cut


def _filtered(logits_bv, temperature_b, top_k_b, top_p_b) -> _Filtered:
    """Rows scaled by their temperature, with the cut of their top-k and top-p filters."""
    scale_b = jnp.where(temperature_b > 0, jnp.maximum(temperature_b, _MIN_TEMPERATURE), 1.0)
    x_bv = logits_bv.astype(jnp.float32) / scale_b[:, None]
    key_bv = _order_keys(x_bv)
    max_b = jnp.max(x_bv, -1)
    e_bv = jnp.exp(x_bv - max_b[:, None])
    filters = jnp.any((top_k_b > 0) | (top_p_b < 1.0))
    cut_b = jax.lax.cond(filters, lambda: _cuts(x_bv, key_bv, e_bv, top_k_b, top_p_b),
                         lambda: jnp.full(top_k_b.shape, _KEEP_ALL))
    return _Filtered(x_bv, key_bv, e_bv, _order_keys(max_b), cut_b)


def filter_logits(logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array,
                  top_p_b: jax.Array) -> jax.Array:
    """Per row: temperature, then top-k (ties at the k-th value kept; 0 or >= V: off), then top-p
    (the smallest set of the highest tokens whose mass reaches top_p, on the top-k-filtered
    distribution; always >= 1 token; 1.0: off). Removed tokens get -inf. float32 [B, V].

    Rows with temperature 0 are greedy and the caller's to handle (they come back unscaled, with
    their filters; a positive temperature below 1e-6 counts as 1e-6). Jittable; the settings are
    data, so new values compile nothing."""
    f = _filtered(logits_bv, jnp.asarray(temperature_b, jnp.float32),
                  jnp.asarray(top_k_b, jnp.int32), jnp.asarray(top_p_b, jnp.float32))
    return jnp.where(f.key_bv >= f.cut_b[:, None], f.x_bv, -jnp.inf)


def _inverse_cdf(w_bv: jax.Array, u_b: jax.Array) -> jax.Array:
    """Per row, the first token whose cumulative weight (vocabulary order) exceeds u * total: one
    block's worth of cumsum after a cumsum of block sums; never a token of weight 0."""
    b, v = w_bv.shape
    size = _BLOCK if v % _BLOCK == 0 else v  # an odd vocabulary: one block
    w_bnk = w_bv.reshape(b, v // size, size)
    cum_bn = jnp.cumsum(jnp.sum(w_bnk, -1), -1)
    target_b = u_b * cum_bn[:, -1]
    blk_b = _first_above(cum_bn, target_b)
    before_b = jnp.where(blk_b > 0, jnp.take_along_axis(cum_bn, blk_b[:, None] - 1, 1)[:, 0], 0.0)
    w_bk = jnp.take_along_axis(w_bnk, blk_b[:, None, None], 1)[:, 0]
    return blk_b * size + _first_above(jnp.cumsum(w_bk, -1), target_b - before_b)


def _first_above(cum_bn: jax.Array, target_b: jax.Array) -> jax.Array:
    """The first index whose cumulative value exceeds target; past the end (rounding), the last
    index where the cumulative value still grows, so never an entry of weight 0."""
    n = cum_bn.shape[1]
    idx_b = jnp.sum(cum_bn <= target_b[:, None], -1).astype(jnp.int32)
    grows_bn = jnp.diff(cum_bn, prepend=0.0, axis=-1) > 0
    last_b = jnp.max(jnp.where(grows_bn, jnp.arange(n, dtype=jnp.int32), 0), -1)
    return jnp.minimum(idx_b, last_b)


def sample_rows(logits_bv: jax.Array, uniform_b: jax.Array, temperature_b: jax.Array,
                top_k_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Next token ids int32 [B]: the argmax of the raw logits where temperature is 0, else the
    row's filtered softmax (`filter_logits`) sampled by inverse CDF with its uniform in [0, 1)."""
    temperature_b = jnp.asarray(temperature_b, jnp.float32)
    greedy_b = temperature_b <= 0.0

    def sampled():
        # a greedy row keeps only its largest value and draws 0: its first maximum, as argmax
        f = _filtered(logits_bv, temperature_b,
                      jnp.where(greedy_b, 0, jnp.asarray(top_k_b, jnp.int32)),
                      jnp.where(greedy_b, 1.0, jnp.asarray(top_p_b, jnp.float32)))
        cut_b = jnp.where(greedy_b, f.max_key_b, f.cut_b)
        w_bv = jnp.where(f.key_bv >= cut_b[:, None], f.e_bv, 0.0)
        tok_b = _inverse_cdf(w_bv, jnp.where(greedy_b, 0.0, uniform_b))
        return jnp.clip(tok_b, 0, logits_bv.shape[1] - 1)

    greedy = lambda: jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(jnp.all(greedy_b), greedy, sampled)


def row_uniform(key_b2: jax.Array, step_b: jax.Array) -> jax.Array:
    """One uniform float32 in [0, 1) per row, from the row's own PRNG key (uint32 [B, 2], the
    jax.random.PRNGKey layout) folded with its own step: a row's stream depends on its key only."""
    return jax.vmap(lambda k, s: jax.random.uniform(jax.random.fold_in(k, s)))(key_b2, step_b)


def request_key(seed: int, sample_index: int) -> np.ndarray:
    """The PRNG key (uint32 [2]) of one sample of a request:
    fold_in(PRNGKey(seed), sample_index)."""
    return np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), sample_index))


def sample_seed(seed: int, prompt_id: str, index: int, round_: int | None = None) -> int:
    """The seed of one sample (one request of n = 1, in process or over HTTP): a function of the
    run seed, the prompt id and the sample index only, so a resumed run asks for what an
    uninterrupted one did, whatever ran beside it; `round_`: one round of a sample sampled in
    several (budget forcing)."""
    key = f"{seed}:{prompt_id}:{index}" + ("" if round_ is None else f":{round_}")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
