"""Attention over a full sequence or a KV cache, behind one function, `attention`.

Paths: the dense path (a [B, T, S] mask, float32 scores; the KV-cache decode step, which reads
the cache once per step), the pure-JAX blockwise flash attention (`distill.models.flash`, every
backend), fused kernels (`distill.models.kernels`: Pallas splash on TPU, cuDNN and Pallas flash
on GPU) and context parallelism over a mesh's `context` axis (`distill.models.context`).
`choose_attention` picks one per call from the model's `attention` setting, the platform, the
dtype, the shapes and the mask, and logs its choice once.

Dimension alphabet: B batch, T query length, S key/cache length, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head size, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from distill.errors import DistillError
from distill.models.context import context_parallel_attention, context_size
from distill.models.flash import blockwise_attention
from distill.models.kernels import INTERPRETABLE, KERNELS, PLATFORM, fused_attention, unsupported
from distill.models.masks import MaskInfo, attention_mask

__all__ = ["BLOCKWISE_MIN_TOKENS", "MaskInfo", "attention", "attention_mask",
           "blockwise_attention", "choose_attention", "dot_product_attention"]

BLOCKWISE_MIN_TOKENS = 2048  # on CPU "auto" attends blockwise from this many query tokens on

log = logging.getLogger(__name__)
_LOGGED: set = set()


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


def choose_attention(setting: str, platform: str, *, dtype, t: int, s: int, h: int, hv: int,
                     packed: bool) -> tuple[str, str]:
    """(path, why) for a full-sequence attention: "blockwise", or a kernel of
    `distill.models.kernels` (with "+interpret" when it runs in the Pallas interpreter because
    `platform` is not the kernel's own).

    "auto": TPU -> splash; GPU -> cuDNN for rows without segments in bfloat16 / float16, else the
    Pallas flash kernel; anything a kernel does not support, and every other platform ->
    blockwise. A kernel named explicitly must support the call and the platform (else a
    DistillError); on CPU a Pallas kernel runs in the interpreter (slow: for tests).
    """
    shape = dict(t=t, s=s, h=h, hv=hv, packed=packed, dtype=dtype)
    if setting in ("blockwise", "dense"):
        return "blockwise", f"attention: {setting}"
    if setting in KERNELS:
        native = PLATFORM[setting] == platform
        if not native and not (platform == "cpu" and setting in INTERPRETABLE):
            raise DistillError(f"attention: {setting} needs a {PLATFORM[setting]}, not {platform}"
                               " (set student.attention: auto)")
        reason = unsupported(setting, **shape)
        if reason:
            raise DistillError(f"attention: {setting}: {reason} (set student.attention: auto)")
        if native:
            return setting, f"attention: {setting}"
        return f"{setting}+interpret", f"attention: {setting} on {platform} (Pallas interpreter)"
    if setting != "auto":
        raise DistillError(f"unknown attention setting {setting!r}")
    candidates = {"tpu": ("splash",), "gpu": ("cudnn", "pallas_gpu")}.get(platform, ())
    why = []
    for kernel in candidates:
        reason = unsupported(kernel, **shape)
        if reason is None:
            return kernel, f"auto on {platform}" + (f" ({'; '.join(why)})" if why else "")
        why.append(f"not {kernel}: {reason}")
    return "blockwise", f"auto on {platform}" + (f" ({'; '.join(why)})" if why else "")


def attention(q_btnh: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float,
              kv_layout: str = "bskh") -> jax.Array:
    """Attention of q [B, T, N, H] over k, v; returns [B, T, N, H_v].

    A dense [B, T, S] mask (the KV-cache path, short sequences on CPU): `dot_product_attention`.
    A `MaskInfo` (a full-sequence forward) with k, v [B, S, K, H]: context-parallel attention
    when the mesh has a `context` axis, else the path `choose_attention` picks for its setting.
    """
    if not isinstance(mask, MaskInfo):
        return dot_product_attention(q_btnh, k, v, mask, scale, kv_layout)
    if kv_layout != "bskh":
        return dot_product_attention(q_btnh, k, v, mask.dense(), scale, kv_layout)
    if context_size() > 1:
        _log_once("context", f"attention: context parallel ({mask.context}) over "
                  f"context={context_size()}, blockwise on each device")
        return context_parallel_attention(q_btnh, k, v, mask, scale, mask.context)
    path, why = choose_attention(mask.impl, jax.default_backend(), dtype=q_btnh.dtype,
                                 t=q_btnh.shape[1], s=k.shape[1], h=q_btnh.shape[-1],
                                 hv=v.shape[-1], packed=mask.q_segments is not None)
    _log_once(path, f"attention: {path} ({why})")
    if path == "blockwise":
        return blockwise_attention(q_btnh, k, v, mask, scale)
    kernel, _, interpret = path.partition("+")
    return fused_attention(kernel, q_btnh, k, v, mask.q_segments, scale,
                           interpret=bool(interpret))


def _log_once(key: str, message: str) -> None:
    if (key, message) not in _LOGGED:
        _LOGGED.add((key, message))
        log.info(message)
