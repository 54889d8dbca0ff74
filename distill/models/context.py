"""Context parallelism: attention over rows whose sequence is split over the mesh's `context`
axis (64k-128k-token rows that one device cannot hold), forward and backward, packed segments
included. Two strategies, inside one `shard_map` over the mesh:

- "all_gather": every device gathers the whole row's keys and values (and their slots, validity
  and segments) and attends its own queries over them blockwise; the gradient of the gather is a
  reduce-scatter. Grouped-query students keep K/V small (Qwen2.5-7B: 4 kv heads x 128, 2 KiB
  of bfloat16 K and V per token and layer, 256 MiB for a 131k-token row): the Llama 3 recipe.
- "ring": keys and values travel round the ring of `context` devices (`ppermute`), one chunk a
  step; each step's blockwise attention returns its log-sum-exp and the chunks combine exactly
  (online softmax across chunks). Memory holds one chunk of K/V at a time, plus the residuals.

Queries, keys and values arrive as [B, T, N, H] / [B, S, K, H] global arrays under `jax.jit`
with the mesh set; their rows go over the batch axes (data, fsdp) and heads over `tensor` when it
divides both head counts. Dimension alphabet as in `distill.models.attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from distill.models.flash import blockwise_attention, blockwise_attention_lse
from distill.models.masks import MaskInfo
from distill.models.settings import CONTEXT_PARALLEL
from distill.parallel import logical_to_spec

AXIS = "context"


def context_size() -> int:
    """Size of the `context` axis of the mesh set with `jax.set_mesh` (1: none, or inside a
    `shard_map` already)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or not mesh.are_all_axes_auto:
        return 1
    return mesh.shape[AXIS]


def context_parallel_attention(q_btnh, k_bskh, v_bskh, mask: MaskInfo, scale: float,
                               strategy: str = "all_gather") -> jax.Array:
    """Attention of `mask` (a full-sequence `MaskInfo`) with the sequence split over `context`;
    equals `blockwise_attention` on the whole rows. Returns [B, T, N, H_v]."""
    if strategy not in CONTEXT_PARALLEL:
        raise ValueError(f"context parallelism {strategy!r}: choose from {tuple(CONTEXT_PARALLEL)}")
    mesh = jax.sharding.get_abstract_mesh()
    b, t, n, _ = q_btnh.shape
    kh = k_bskh.shape[2]
    cp = mesh.shape[AXIS]
    if t % cp or k_bskh.shape[1] % cp:
        raise ValueError(f"context parallelism: {t} tokens a row do not split over "
                         f"context={cp} devices")
    rows = logical_to_spec(("batch",), (b,), mesh)[0]  # data x fsdp where they divide b
    tp = mesh.shape.get("tensor", 1)
    heads = "tensor" if tp > 1 and n % tp == 0 and kh % tp == 0 else None
    seq = PartitionSpec(rows, AXIS)
    act = PartitionSpec(rows, AXIS, heads, None)
    segments = mask.q_segments is not None
    side = tuple(a for a in (mask.q_slots, mask.k_slots, mask.k_valid) + (
        (mask.q_segments, mask.k_segments) if segments else ()))
    local = _ring if strategy == "ring" else _all_gather

    def per_device(q, k, v, *side):
        return local(q, k, v, MaskInfo(*side), float(scale), cp)

    return jax.shard_map(per_device, in_specs=(act, act, act, *(seq,) * len(side)),
                         out_specs=act, check_vma=False)(q_btnh, k_bskh, v_bskh, *side)


def _all_gather(q, k, v, mask: MaskInfo, scale, cp):
    def gather(x):
        return None if x is None else jax.lax.all_gather(x, AXIS, axis=1, tiled=True)

    whole = MaskInfo(mask.q_slots, gather(mask.k_slots), gather(mask.k_valid), mask.q_segments,
                     gather(mask.k_segments))
    return blockwise_attention(q, gather(k), gather(v), whole, scale)


def _ring(q, k, v, mask: MaskInfo, scale, cp):
    """cp steps: attend to the K/V chunk in hand, combine, pass it on to the next device."""
    perm = [(j, (j + 1) % cp) for j in range(cp)]
    chunk = (k, v, mask.k_slots, mask.k_valid, mask.k_segments)
    out = lse = None
    for step in range(cp):
        k_i, v_i, slots_i, valid_i, seg_i = chunk
        o_i, lse_i = blockwise_attention_lse(
            q, k_i, v_i, MaskInfo(mask.q_slots, slots_i, valid_i, mask.q_segments, seg_i), scale)
        out, lse = (o_i.astype(jnp.float32), lse_i) if out is None else _combine(out, lse, o_i,
                                                                                 lse_i)
        if step < cp - 1:
            chunk = jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, perm), chunk)
    return out.astype(v.dtype)


def _combine(out_a, lse_a, out_b, lse_b):
    """Two attention results over disjoint key sets -> the result over their union (float32).

    out [B, T, N, H_v], lse [B, T, N] (-inf: no key seen). The shift by the running maximum is
    a constant of the math, so it carries no gradient."""
    m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)  # 0 where a side saw nothing
    total = w_a + w_b
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    out = (w_a[..., None] * out_a + w_b[..., None] * out_b.astype(jnp.float32)) / safe[..., None]
    return out, jnp.where(seen, m + jnp.log(safe), -jnp.inf)
