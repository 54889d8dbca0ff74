"""Fused attention kernels for accelerators, behind one calling convention: full-sequence causal
attention of packed rows (query t sees keys s <= t of its own segment; slots 0..T-1 on both
sides), q [B, T, N, H], k and v [B, S, K, H], segments [B, T] int (0 = padding) or None.

- "splash": Pallas splash attention for TPU (`jax.experimental.pallas.ops.tpu.splash_attention`),
  causal mask, segment ids, grouped-query heads natively, fused backward kernel.
- "pallas_gpu": the Pallas (Triton) flash attention for GPU (`jax.experimental.pallas.ops.gpu
  .attention.mha`), causal, segment ids; its heads must match, so K/V heads are repeated G times
  (their gradients summed back by autodiff).
- "cudnn": cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation=
  "cudnn")`), causal, GQA natively; rows without segments only (packed rows would need a
  [B, T, S] bias, which is what a fused kernel is there to avoid).

Padding (segment 0) attends to padding in these kernels, where the blockwise path gives it zeros;
no real token sees padding either way, so every real position, and every gradient of a loss over
real positions, is the same. `interpret=True` runs a Pallas kernel in the Pallas interpreter
(any backend, slowly): how the CPU tests check the kernels against the reference.

Dimension alphabet: B batch, T query length, S key length, N query heads, K kv heads, G = N / K,
H head size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KERNELS = ("splash", "pallas_gpu", "cudnn")
PLATFORM = {"splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}  # where each compiles natively
INTERPRETABLE = ("splash", "pallas_gpu")  # runnable in the Pallas interpreter elsewhere


def unsupported(kernel: str, *, t: int, s: int, h: int, hv: int, packed: bool,
                dtype) -> str | None:
    """Why `kernel` cannot run this attention (None: it can). The shape rules the kernels
    enforce, checked before tracing so that `auto` can fall back instead of failing."""
    if h != hv:
        return f"value head size {hv} differs from the query/key head size {h}"
    if t != s:
        return f"{t} queries over {s} keys (the kernels take full sequences)"
    if kernel == "splash":
        if t % 128:
            return f"sequence length {t} is not a multiple of 128"
    elif kernel == "pallas_gpu":
        if h & (h - 1) or h < 16:
            return f"head size {h} is not a power of two >= 16"
        if t % 16:
            return f"sequence length {t} is not a multiple of 16"
    elif kernel == "cudnn":
        if packed:
            return "packed rows (segment ids) need a [B, T, S] bias on cuDNN"
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN flash attention takes bfloat16 / float16, not {jnp.dtype(dtype).name}"
        if h > 128 or h % 8:
            return f"head size {h} is above 128 or not a multiple of 8"
    else:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
    return None


def fused_attention(kernel: str, q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                    segments_bt: jax.Array | None, scale: float, *, block: int = 512,
                    interpret: bool = False) -> jax.Array:
    """Causal attention of packed rows with `kernel`; [B, T, N, H] in q's dtype. `block` is the
    largest query / key tile tried (halved until it divides T)."""
    b, t, n, h = q_btnh.shape
    reason = unsupported(kernel, t=t, s=k_bskh.shape[1], h=h, hv=v_bskh.shape[-1],
                         packed=segments_bt is not None, dtype=q_btnh.dtype)
    if reason:
        raise ValueError(f"attention kernel {kernel!r}: {reason}")
    if kernel == "cudnn":
        return cudnn_attention(q_btnh, k_bskh, v_bskh, scale)
    tile = _tile(t, block, 128 if kernel == "splash" else 16)
    if kernel == "splash":
        return _splash(q_btnh, k_bskh, v_bskh, segments_bt, scale, tile, interpret)
    return _pallas_gpu(q_btnh, k_bskh, v_bskh, segments_bt, scale, tile, interpret)


def _tile(t: int, block: int, smallest: int) -> int:
    """The largest power-of-two tile <= min(block, t) that divides t (Triton takes powers of two
    only; `unsupported` has checked that `smallest`, a power of two, divides t)."""
    tile = max(1 << (min(block, t).bit_length() - 1), smallest)
    while t % tile:
        tile //= 2
    return tile


def _splash(q, k, v, segments, scale, tile, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    b, t, n, _ = q.shape
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(n)])
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                              block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                              use_fused_bwd_kernel=True)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    q_bnth = jnp.einsum("btnh->bnth", q * jnp.asarray(scale, q.dtype))  # splash does not scale
    k_bksh, v_bksh = jnp.einsum("bskh->bksh", k), jnp.einsum("bskh->bksh", v)
    if segments is None:
        out = jax.vmap(kernel)(q_bnth, k_bksh, v_bksh)
    else:
        segments = segments.astype(jnp.int32)
        out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(
            seg, seg)))(q_bnth, k_bksh, v_bksh, segments)
    return jnp.einsum("bnth->btnh", out)


def _pallas_gpu(q, k, v, segments, scale, tile, interpret):
    from jax.experimental.pallas.ops.gpu import attention as triton

    g = q.shape[2] // k.shape[2]
    if g > 1:
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    sizes = triton.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=tile, block_kv_dkv=tile,
                              block_q_dq=tile, block_kv_dq=tile)
    seg = None if segments is None else segments.astype(jnp.int32)
    return triton.mha(q, k, v, seg, sm_scale=float(scale), causal=True, block_sizes=sizes,
                      interpret=interpret)


def cudnn_attention(q_btnh, k_bskh, v_bskh, scale, implementation: str = "cudnn"):
    """Causal GQA through `jax.nn.dot_product_attention`; implementation "xla" is the same call
    on any backend (how the CPU tests check this wrapper's layout, scale and head grouping)."""
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, scale=float(scale),
                                        is_causal=True, implementation=implementation)
