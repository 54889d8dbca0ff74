"""Blockwise flash attention in pure JAX: an online softmax over [block_q, block_k] tiles under
`lax.scan`, O(T) memory, with FlashAttention-2's backward as a custom VJP. The portable path on
every backend, the inner step of context parallelism (`distill.models.context`), and the
reference the fused kernels are tested against.

At long T the [B, T, S] mask and the float32 [B, N, T, S] scores of `dot_product_attention` grow
with T^2 (at T = 32768 one head's scores are 4 GiB per sequence); this path builds neither.

Dimension alphabet: B batch, T query length, S key length, N query heads, K kv heads, G query
heads per kv head (N = K * G), H head size.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from distill.models.masks import MaskInfo, attention_mask


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
    return blockwise_attention_lse(q_btnh, k_bskh, v_bskh, mask, scale, block_q, block_k)[0]


def blockwise_attention_lse(q_btnh, k_bskh, v_bskh, mask: MaskInfo, scale: float,
                            block_q: int = 512, block_k: int = 512) -> tuple[jax.Array, jax.Array]:
    """`blockwise_attention` and the float32 log-sum-exp [B, T, N] of every query's scores (-inf
    for a query that sees no key), both differentiable: what combines attention over key chunks
    (ring attention) exactly."""
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
    out, lse = _flash(q_blocks, k_blocks, v_blocks, q_side, k_side, float(scale))
    out = jnp.moveaxis(out, 0, 1).reshape(b, -1, n, v_bskh.shape[-1])  # [B, T_padded, N, H_v]
    lse = jnp.einsum("nbkgq->bnqkg", lse).reshape(b, -1, n)  # [B, T_padded, N]
    return out[:, :t], lse[:, :t]


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
    """Attention output [nq, B, bq, K, G, H_v] of blocked inputs (see `blockwise_attention`) and
    the float32 log-sum-exp [nq, B, K, G, bq] (-inf where a query sees no key)."""
    return _flash_forward(q_blocks, k_blocks, v_blocks, q_side, k_side, scale)


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
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
        return None, (jnp.einsum("bkgqh->bqkgh", out).astype(v_blocks.dtype), lse)

    _, (out, lse) = jax.lax.scan(one_q_block, None, (q_blocks, *q_side))
    return out, lse


def _flash_fwd(q_blocks, k_blocks, v_blocks, q_side, k_side, scale):
    out, lse = _flash_forward(q_blocks, k_blocks, v_blocks, q_side, k_side, scale)
    return (out, lse), (q_blocks, k_blocks, v_blocks, q_side, k_side, out, lse)


def _flash_bwd(scale, residuals, cotangents):
    """FlashAttention-2's backward: per key block, recompute each tile's probabilities from the
    saved log-sum-exp; dK, dV accumulate over query blocks, dQ over key blocks (float32). A
    cotangent of the log-sum-exp adds p * d_lse to each score's gradient, i.e. subtracts d_lse
    from the correction term."""
    q_blocks, k_blocks, v_blocks, q_side, k_side, out, lse = residuals
    d_out, d_lse = cotangents
    # rowsum(dO * O) - dLSE [nq, B, K, G, bq]: the softmax Jacobian's correction term
    delta = jnp.einsum("nbqkgh,nbqkgh->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # a query that sees no key: all its p are 0
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
