"""Pieces shared by the dense students and the MoE teacher: parameters, norms, rotary embeddings,
attention, the gated MLP and the named remat policies.

Dimension alphabet: B batch, T query length, S key/cache length, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head size, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distill.parallel import constrain

# ---------------------------------------------------------------------------------------------
# Parameters


def param(
    key: jax.Array,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype,
    init: str | Callable = "normal",
    scale: float = 0.02,
) -> nnx.Param:
    """A parameter with logical axis names, one per dimension (see `distill.parallel` for the rules)."""
    assert len(shape) == len(names), (shape, names)
    if init == "normal":
        value = scale * jax.random.normal(key, shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = init(key, shape)
    # eager_sharding=False: the model never names a mesh; placement comes from the rules table.
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


# ---------------------------------------------------------------------------------------------
# Norms


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 like transformers (normalise in f32, cast, then scale)."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[jax.Array, float]:
    """Inverse frequencies [H/2] and the cos/sin attention factor for a rope_scaling dict (HF keys)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")


def _llama3_inv_freq(inv_freq: jax.Array, s: dict) -> jax.Array:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor (DeepSeek's `yarn_get_mscale`)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(inv_freq, head_dim, theta, s) -> tuple[jax.Array, float]:
    factor = float(s["factor"])
    old_ctx = s["original_max_position_embeddings"]
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    if mscale and mscale_all:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention_factor = s.get("attention_factor") or yarn_mscale(factor)

    def correction_dim(rotations):
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv, float(attention_factor)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: jax.Array, factor: float = 1.0):
    """cos, sin of shape [B, T, H] (the two halves repeated, HF's half-split layout), float32."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor


def apply_rope(x_bt_h: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] with the half-split ("rotate_half") convention."""
    dtype = x_bt_h.dtype
    x = x_bt_h.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return (x * cos + rotated * sin).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Attention


def attention_mask(
    q_slot_bt: jax.Array,
    k_slot_bs: jax.Array,
    k_valid_bs: jax.Array,
    q_segment_bt: jax.Array | None = None,
    k_segment_bs: jax.Array | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: causal by slot index, padding removed, documents kept apart by segment."""
    mask = (k_slot_bs[:, None, :] <= q_slot_bt[:, :, None]) & k_valid_bs[:, None, :]
    if q_segment_bt is not None:
        mask &= q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
    return mask


def dot_product_attention(
    q_btnh: jax.Array, k: jax.Array, v: jax.Array, mask_bts: jax.Array, scale: float,
    kv_layout: str = "bskh",
) -> jax.Array:
    """Grouped-query attention; softmax in float32. Returns [B, T, N, H_v].

    k, v: [B, S, K, H] ("bskh") or heads-major [B, K, S, H] ("bksh", the KV-cache layout, which
    needs no transpose of the cache).
    """
    b, t, n, h = q_btnh.shape
    kh = k.shape[kv_layout.index("k")]
    q_btkgh = q_btnh.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum(f"btkgh,{kv_layout}->bkgts", q_btkgh, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv_layout}->btkgh", probs, v)
    return out.reshape(b, t, n, v.shape[-1])


# ---------------------------------------------------------------------------------------------
# Blockwise attention
#
# At long T the [B, T, S] mask and the float32 [B, N, T, S] scores of `dot_product_attention`
# grow with T^2 (at T = 32768 one head's scores are 4 GiB per sequence), so long sequences
# attend block by block with an online softmax and build neither.

BLOCKWISE_MIN_TOKENS = 2048  # "auto" attends blockwise from this many query tokens on


class MaskInfo(NamedTuple):
    """What an attention mask is made of, O(T + S) instead of the [B, T, S] mask itself.

    Key s is visible to query t when k_slots[s] <= q_slots[t] (causal by slot index), k_valid[s],
    and (when segments are given) q_segments[t] == k_segments[s]. A pytree, so it passes through
    `lax.scan` and `jax.jit` like the dense mask did.
    """

    q_slots: jax.Array  # [B, T] int32
    k_slots: jax.Array  # [B, S] int32
    k_valid: jax.Array  # [B, S] bool
    q_segments: jax.Array | None = None  # [B, T] int, None = one document per row
    k_segments: jax.Array | None = None  # [B, S]

    def dense(self) -> jax.Array:
        """The boolean [B, T, S] mask `dot_product_attention` takes."""
        return attention_mask(*self)


def attention(q_btnh: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float,
              kv_layout: str = "bskh") -> jax.Array:
    """`blockwise_attention` when `mask` is a `MaskInfo` (and k, v are [B, S, K, H]), else
    `dot_product_attention` with the dense mask. Returns [B, T, N, H_v]."""
    if isinstance(mask, MaskInfo):
        if kv_layout == "bskh":
            return blockwise_attention(q_btnh, k, v, mask, scale)
        mask = mask.dense()
    return dot_product_attention(q_btnh, k, v, mask, scale, kv_layout)


def blockwise_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask: MaskInfo,
                        scale: float, block_q: int = 512, block_k: int = 512) -> jax.Array:
    """Grouped-query attention block by block (flash-style online softmax in float32).

    Equals `dot_product_attention(q, k, v, mask.dense(), scale)` on every query that sees at least
    one key; a query that sees none gets zeros (the dense path gives an average of all values
    there). Each [block_q, block_k] tile's mask comes from the slot indices, validity and
    segments, and tiles no query of which sees any key are skipped (half the tiles under a causal
    mask). The backward pass recomputes the tiles, so what it keeps per call is O(T * N * H): the
    inputs, the output and one log-sum-exp per query and head. v may have its own head size
    (MLA). T and S need not be multiples of the block sizes. Returns [B, T, N, H_v] in v's dtype.
    """
    b, t, n, h = q_btnh.shape
    s, kh = k_bskh.shape[1], k_bskh.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    q_blocks = _to_blocks(q_btnh.reshape(b, t, kh, n // kh, h), bq)  # [nq, B, bq, K, G, H]
    k_blocks, v_blocks = _to_blocks(k_bskh, bk), _to_blocks(v_bskh, bk)  # [nk, B, bk, K, H]
    # padded query rows see nothing (lowest slot), padded keys are invalid
    q_side = (_to_blocks(mask.q_slots, bq, jnp.iinfo(jnp.int32).min),
              None if mask.q_segments is None else _to_blocks(mask.q_segments, bq))
    k_side = (_to_blocks(mask.k_slots, bk), _to_blocks(mask.k_valid, bk, False),
              None if mask.k_segments is None else _to_blocks(mask.k_segments, bk))
    out = _flash(q_blocks, k_blocks, v_blocks, q_side, k_side, float(scale))
    out = jnp.moveaxis(out, 0, 1).reshape(b, -1, n, v_bskh.shape[-1])  # [B, T_padded, N, H_v]
    return out[:, :t]


def _to_blocks(x: jax.Array, size: int, pad_value=0) -> jax.Array:
    """[B, T, ...] -> [ceil(T / size), B, size, ...], the tail padded with `pad_value`."""
    pad = -x.shape[1] % size
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, pad)
        x = jnp.pad(x, widths, constant_values=pad_value)
    x = x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _tile_mask(q_side, k_side) -> jax.Array:
    """Boolean [B, bq, bk] of one tile from its query and key blocks' mask pieces."""
    (q_slots, q_seg), (k_slots, k_valid, k_seg) = q_side, k_side
    return attention_mask(q_slots, k_slots, k_valid, q_seg, k_seg)


def _scores(q_bqkgh, k_bskh, allowed_bqs, scale) -> jax.Array:
    """float32 [B, K, G, bq, bk] scores, -inf where the key is hidden."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh, preferred_element_type=jnp.float32)
    return jnp.where(allowed_bqs[:, None, None], s * scale, -jnp.inf)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_blocks, k_blocks, v_blocks, q_side, k_side, scale):
    """[nq, B, bq, K, G, H_v] attention output of blocked inputs (see `blockwise_attention`)."""
    return _flash_forward(q_blocks, k_blocks, v_blocks, q_side, k_side, scale)[0]


def _flash_forward(q_blocks, k_blocks, v_blocks, q_side, k_side, scale):
    """Output blocks and the float32 log-sum-exp [nq, B, K, G, bq] of every query row."""
    # One barrier over all inputs: whenever q, k or v are unknown to partial evaluation, so are
    # the mask pieces (see the note above `_flash.defvjp`).
    q_blocks, k_blocks, v_blocks, q_side, k_side = jax.lax.optimization_barrier(
        (q_blocks, k_blocks, v_blocks, q_side, k_side))
    _, b, bq, kh, g, _ = q_blocks.shape
    hv = v_blocks.shape[-1]

    def one_q_block(_, q_in):
        q, q_mask = q_in[0], q_in[1:]

        def kv_step(carry, kv_in):
            k, v, k_mask = kv_in[0], kv_in[1], kv_in[2:]
            allowed = _tile_mask(q_mask, k_mask)

            def update(carry):
                m, l, acc = carry  # running max, normaliser [B, K, G, bq]; acc [B, K, G, bq, H_v]
                s = _scores(q, k, allowed, scale)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows that saw no key yet
                p = jnp.exp(s - m_safe[..., None])
                rescale = jnp.exp(m - m_safe)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v,
                                preferred_element_type=jnp.float32)
                return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv

            return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry), None

        init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32), jnp.zeros((b, kh, g, bq, hv), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (k_blocks, v_blocks, *k_side))
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]  # zeros where no key was visible
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return None, (jnp.einsum("bkgqh->bqkgh", out).astype(v_blocks.dtype), lse)

    _, (out, lse) = jax.lax.scan(one_q_block, None, (q_blocks, *q_side))
    return out, lse


def _flash_fwd(q_blocks, k_blocks, v_blocks, q_side, k_side, scale):
    out, lse = _flash_forward(q_blocks, k_blocks, v_blocks, q_side, k_side, scale)
    return out, (q_blocks, k_blocks, v_blocks, q_side, k_side, out, lse)


def _flash_bwd(scale, residuals, d_out):
    """FlashAttention-2's backward: per key block, recompute each tile's probabilities from the
    saved log-sum-exp; dK, dV accumulate over query blocks, dQ over key blocks (float32)."""
    q_blocks, k_blocks, v_blocks, q_side, k_side, out, lse = residuals
    # rowsum(dO * O) [nq, B, K, G, bq]: the softmax Jacobian's correction term
    delta = jnp.einsum("nbqkgh,nbqkgh->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    _, b, bk, kh, h = k_blocks.shape
    hv = v_blocks.shape[-1]

    def one_kv_block(dq_sum, kv_in):
        k, v, k_mask = kv_in[0], kv_in[1], kv_in[2:]

        def q_step(carry, q_in):
            q, do, lse_q, delta_q, q_mask = q_in[0], q_in[1], q_in[2], q_in[3], q_in[4:]
            allowed = _tile_mask(q_mask, k_mask)

            def grads(_):
                p = jnp.exp(_scores(q, k, allowed, scale) - lse_q[..., None])  # [B, K, G, bq, bk]
                dv = jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do.dtype), do,
                                preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do, v, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_q[..., None]) * scale
                dq = jnp.einsum("bkgqs,bskh->bqkgh", ds.astype(k.dtype), k,
                                preferred_element_type=jnp.float32)
                dk = jnp.einsum("bkgqs,bqkgh->bskh", ds.astype(q.dtype), q,
                                preferred_element_type=jnp.float32)
                return dk, dv, dq

            def skip(_):
                return (jnp.zeros((b, bk, kh, h), jnp.float32),
                        jnp.zeros((b, bk, kh, hv), jnp.float32),
                        jnp.zeros(q.shape, jnp.float32))

            dk, dv, dq = jax.lax.cond(jnp.any(allowed), grads, skip, None)
            return (carry[0] + dk, carry[1] + dv), dq

        init = (jnp.zeros((b, bk, kh, h), jnp.float32), jnp.zeros((b, bk, kh, hv), jnp.float32))
        (dk, dv), dq = jax.lax.scan(q_step, init, (q_blocks, d_out, lse, delta, *q_side))
        return dq_sum + dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(one_kv_block, jnp.zeros(q_blocks.shape, jnp.float32),
                                (k_blocks, v_blocks, *k_side))
    return (dq.astype(q_blocks.dtype), dk.astype(k_blocks.dtype), dv.astype(v_blocks.dtype),
            None, None)


# Two things would keep O(T * S) memory if partial evaluation could see into the tiles: a layer
# remat policy that saves matmul outputs ("dots") would keep every tile's scores, and when the
# layer scan is differentiated JAX hoists the work that depends on loop invariants alone (the
# mask pieces, the same in every layer) out of the loop, stacking each tile's share of it (its
# mask, its -inf fill, its float32 scores select) as [nq, nk, B, K, G, bq, bk] residuals.
# optimize_remat makes the differentiated forward one opaque step. But under a layer remat
# ("full", "dots") the forward pass needs only the output, so JAX swaps that step for the plain
# `_flash` body, which is open again: the optimization barrier in `_flash_forward` makes the mask
# pieces as unknown as q, k and v there, so nothing per tile is hoisted or saved.
_flash.defvjp(_flash_fwd, _flash_bwd, optimize_remat=True)


# ---------------------------------------------------------------------------------------------
# Gated MLP


def swiglu(x_btd: jax.Array, w_gate_df: jax.Array, w_up_df: jax.Array, w_down_fd: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)) over the last axis of x, in x's dtype."""
    dt = x_btd.dtype
    gate = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dt))
    up = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dt))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down_fd.astype(dt))


# ---------------------------------------------------------------------------------------------
# Remat


REMAT_POLICIES: dict[str, Callable | None] = {  # the names of distill.config.RematName
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap a scan body with the named rematerialisation policy."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose from {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


# ---------------------------------------------------------------------------------------------
# Decoder plumbing shared by the dense and MoE models


RESIDUAL = ("act_batch", "act_seq", "act_embed")  # logical names of the residual stream [B, T, D]


class Unstacked(tuple):
    """The L per-layer arrays of one stacked [L, ...] parameter or cache, as separate arrays.

    On the CPU, `lax.scan` copies every layer's slice of the stacked weights and KV cache out of
    the stacked arrays before using it (XLA:CPU's matmul and attention kernels do not read a
    dynamic slice in place); for decoding, where each step reads every weight and the whole cache
    once, those copies cost as much as the reads. `unstack_layers` splits the stacks once, before
    sampling, and `scan_blocks` then runs the layers unrolled on the separate arrays, updating
    each layer's cache in place. (Measured on SmolLM2-135M, batch 16, 2 CPU cores: 64 greedy
    tokens in 11.7 s vs 14.4 s scanned; one decode step over 1024 cache slots ~0.5 s vs ~0.95 s.)
    """


jax.tree_util.register_pytree_node(Unstacked, lambda u: (tuple(u), None),
                                   lambda _, xs: Unstacked(xs))


def _is_unstacked(x) -> bool:
    return isinstance(x, Unstacked)


def unstack_layers(tree, stacked_paths=None):
    """Replace the stacked [L, ...] arrays of `tree` by `Unstacked` tuples of per-layer arrays.

    tree: a KV cache (every leaf is stacked), or a model's `nnx.State` with `stacked_paths`, the
    path prefixes of its `PreNormBlocks` (see `layer_stack_paths`); other leaves are kept.
    """
    def split(path, a):
        if stacked_paths is not None and not any(path[: len(p)] == p for p in stacked_paths):
            return a
        return Unstacked(a[i] for i in range(a.shape[0]))

    return jax.tree_util.tree_map_with_path(
        lambda path, a: split(tuple(getattr(k, "key", getattr(k, "name", k)) for k in path), a),
        tree)


def layer_stack_paths(model: nnx.Module) -> list[tuple]:
    """The paths (as tuples of attribute names) of the model's stacked decoder blocks."""
    return [tuple(path) for path, m in nnx.iter_graph(model) if isinstance(m, PreNormBlocks)]


def scan_blocks(blocks: nnx.Module, x_btd, rope, mask_bts, kv, cache_index, policy: str,
                slot_axis: int = 1):
    """Run stacked blocks (params on a leading L axis) under `lax.scan`.

    mask_bts: the dense boolean [B, T, S] mask, or a `MaskInfo` (blockwise attention). Under a
    mesh set with `jax.set_mesh`, the residual stream is constrained to `RESIDUAL`'s layout (split
    over the sequence) as it enters and leaves every layer.

    kv: None, or a tuple of caches stacked on L whose per-layer slices hold the cache slots on
    `slot_axis` (1 for [B, S, ...], 2 for heads-major [B, K, S, H]). Each layer reads its cache
    slice and hands back only its T new entries; they are written into the stacked caches once,
    after the scan (in place inside the decode loop), instead of the scan re-stacking whole caches.
    Returns the hidden state and the updated caches (None without a cache).
    """
    graphdef, stacked = nnx.split(blocks)
    x_btd = constrain(x_btd, RESIDUAL)
    unstacked = [u for u in jax.tree.leaves(stacked, is_leaf=_is_unstacked) if _is_unstacked(u)]
    if unstacked:
        return _unrolled_blocks(graphdef, stacked, len(unstacked[0]), x_btd, rope, mask_bts, kv,
                                cache_index)
    if kv is None:
        def plain(x_btd, state):
            x_btd = constrain(x_btd, RESIDUAL)
            x_btd = nnx.merge(graphdef, state)(x_btd, rope, mask_bts, None, None)[0]
            return constrain(x_btd, RESIDUAL), None

        return jax.lax.scan(remat(plain, policy), x_btd, stacked)[0], None
    t = x_btd.shape[1]

    def body(x_btd, layer):
        state, kv_i = layer
        x_btd = constrain(x_btd, RESIDUAL)
        x_btd, kv_i = nnx.merge(graphdef, state)(x_btd, rope, mask_bts, kv_i, cache_index)
        new = tuple(jax.lax.dynamic_slice_in_dim(u, cache_index, t, axis=slot_axis) for u in kv_i)
        return constrain(x_btd, RESIDUAL), new

    x_btd, new = jax.lax.scan(remat(body, policy), x_btd, (stacked, tuple(kv)))
    start = tuple(cache_index if a == slot_axis + 1 else 0 for a in range(kv[0].ndim))
    return x_btd, tuple(jax.lax.dynamic_update_slice(c, u, start)
                        for c, u in zip(kv, new, strict=True))


def _unrolled_blocks(graphdef, state, n: int, x_btd, rope, mask_bts, kv, cache_index):
    """`scan_blocks` on `Unstacked` parameters (and caches): layer by layer, unrolled."""
    layer_kv = [None] * n if kv is None else [tuple(c[i] for c in kv) for i in range(n)]
    new_kv = []
    for i in range(n):
        state_i = jax.tree.map(lambda u, i=i: u[i], state, is_leaf=_is_unstacked)
        x_btd = constrain(x_btd, RESIDUAL)
        x_btd, kv_i = nnx.merge(graphdef, state_i)(x_btd, rope, mask_bts, layer_kv[i], cache_index)
        new_kv.append(kv_i)
    x_btd = constrain(x_btd, RESIDUAL)
    if kv is None:
        return x_btd, None
    # each layer wrote its new entries into its own cache (updated in place inside a loop); a
    # stacked cache goes back stacked
    return x_btd, tuple(Unstacked(layer[j] for layer in new_kv) if _is_unstacked(c)
                        else jnp.stack([layer[j] for layer in new_kv]) for j, c in enumerate(kv))


class PreNormBlocks(nnx.Module):
    """Layers stacked on L, each `x + attn(norm(x))` then `x + mlp(norm(x))`; `__call__` runs one
    layer's slice inside `scan_blocks`. The factories build the attention and MLP modules."""

    def __init__(self, num_layers: int, d: int, eps: float, dtype, make_attn: Callable,
                 make_mlp: Callable, rngs: nnx.Rngs):
        self.attn_norm_d = param(rngs.params(), (num_layers, d), ("layers", "norm"), dtype, "ones")
        self.attn = make_attn()
        self.mlp_norm_d = param(rngs.params(), (num_layers, d), ("layers", "norm"), dtype, "ones")
        self.mlp = make_mlp()
        self.eps = eps

    def __call__(self, x_btd, rope, mask_bts, kv=None, cache_index=None):
        h, kv = self.attn(rms_norm(x_btd, self.attn_norm_d[...], self.eps), rope, mask_bts, kv,
                          cache_index)
        x_btd = x_btd + h
        x_btd = x_btd + self.mlp(rms_norm(x_btd, self.mlp_norm_d[...], self.eps))
        return x_btd, kv


class CausalLM(nnx.Module):
    """The public forward API every decoder shares.

    Subclasses set `config`, `embed` (with `attend`), `lm_head_dv` unless embeddings are tied, and
    define `_run(tokens_bt, positions_bt, mask_bts, cache, cache_index) -> (hidden_btd, cache)` and
    `init_cache(batch, length)`. `_run`'s mask is a dense [B, T, S] array or a `MaskInfo`; the
    attention modules hand it to `attention`, which picks the path from its type.
    """

    def _init_head(self, cfg, rngs: nnx.Rngs) -> None:
        """The final norm, and the output projection unless embeddings are tied."""
        dt = jnp.dtype(cfg.param_dtype)
        self.final_norm_d = param(rngs.params(), (cfg.hidden_size,), ("norm",), dt, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head_dv = param(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
                                    ("embed", "vocab"), dt)

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        """Full-sequence forward -> float32 logits [B, T, V]. segment_ids (0 = padding) keep
        packed documents apart."""
        return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))

    def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        """`__call__` up to the output head: final-normed hidden states [B, T, D], for losses that
        apply `logits` chunk by chunk."""
        b, t = tokens_bt.shape
        slots_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions_bt = slots_bt if positions_bt is None else positions_bt
        valid_bs = jnp.ones((b, t), bool) if segment_ids_bt is None else segment_ids_bt != 0
        mask = MaskInfo(slots_bt, slots_bt, valid_bs, segment_ids_bt, segment_ids_bt)
        if not self.attends_blockwise(t):
            mask = mask.dense()
        return self._run(tokens_bt, positions_bt, mask, None, None)[0]

    def attends_blockwise(self, t: int) -> bool:
        """Whether a full-sequence forward of `t` tokens uses `blockwise_attention` (config field
        `attention`: "auto" = from `BLOCKWISE_MIN_TOKENS` tokens on). Decoding is always dense."""
        mode = getattr(self.config, "attention", "auto")
        return mode == "blockwise" or (mode == "auto" and t >= BLOCKWISE_MIN_TOKENS)

    def forward_cached(self, tokens_bt, positions_bt, cache, cache_index, kv_valid_bs,
                       last_only: bool = False):
        """Run T new tokens that occupy cache slots [cache_index, cache_index + T).

        kv_valid_bs [B, S] marks the cache slots that hold real tokens (left padding is False).
        Returns float32 logits [B, T, V] ([B, 1, V] for the last token only with `last_only`, as
        a prefill needs: the output head is then not applied to the other T - 1) and the cache.
        """
        b, t = tokens_bt.shape
        s = kv_valid_bs.shape[1]
        q_slots = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        k_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = attention_mask(q_slots, k_slots, kv_valid_bs)
        hidden, cache = self._run(tokens_bt, positions_bt, mask, cache, cache_index)
        return self.logits(hidden[:, -1:] if last_only else hidden), cache

    def logits(self, hidden_btd):
        """Final projection to float32 logits [B, T, V]."""
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden_btd)
        return jnp.einsum("btd,dv->btv", hidden_btd, self.lm_head_dv[...].astype(hidden_btd.dtype),
                          preferred_element_type=jnp.float32)
