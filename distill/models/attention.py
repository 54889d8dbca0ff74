"""Attention over a full sequence or a KV cache, behind one function, `attention`.

Paths: the dense path (a [B, T, S] mask, float32 scores; also the KV-cache decode step, which
reads the cache once per step), the pure-JAX blockwise flash attention (`distill.models.flash`,
every backend), fused kernels (`distill.models.kernels`: Pallas splash on TPU, cuDNN and Pallas
flash on GPU) and context parallelism over a mesh's `context` axis (`distill.models.context`).
`attention_path` is the one rule that picks a path per call, from the model's setting (config
field `attention`, handed to `attention` in `AttentionSettings`), the platform, the dtype, the
shapes and the mask; `attention` logs each choice once.

Dimension alphabet: B batch, T query length, S key/cache length, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head size, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distill.errors import DistillError
from distill.models.context import context_parallel_attention, context_size
from distill.models.flash import blockwise_attention
from distill.models.kernels import INTERPRETABLE, KERNELS, PLATFORM, fused_attention, unsupported
from distill.models.masks import MaskInfo, attention_mask

__all__ = ["BLOCKWISE_MIN_TOKENS", "AttentionCall", "AttentionSettings", "MaskInfo", "attention",
           "attention_mask", "attention_path", "blockwise_attention", "dot_product_attention"]

BLOCKWISE_MIN_TOKENS = 2048  # on CPU "auto" attends blockwise from this many query tokens on

log = logging.getLogger(__name__)
_LOGGED: set = set()


def dot_product_attention(
    q_btnh: jax.Array, k: jax.Array, v: jax.Array, mask_bts: jax.Array, scale: float,
    kv_layout: str = "bskh",
) -> jax.Array:
    """Grouped-query attention; softmax in float32. Returns [B, T, N, H_v].

    k, v: [B, S, K, H] ("bskh") or heads-major [B, K, S, H] ("bksh", the KV-cache layout, which
    needs no transpose of the cache). A query whose mask hides every key averages all values.
    """
    if kv_layout == "bskh":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    return _dense(q_btnh, k, v, mask_bts, float(scale))


def _heads_major(x_btnh: jax.Array, kh: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G*T, H]: each kv head's G query heads as one run of rows."""
    b, t, n, h = x_btnh.shape
    return x_btnh.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, -1, h)


def _tokens_major(x_bkqh: jax.Array, t: int) -> jax.Array:
    """[B, K, G*T, H] -> [B, T, N, H]."""
    b, kh, gt, h = x_bkqh.shape
    return x_bkqh.reshape(b, kh, gt // t, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, -1, h)


def _group_rows(mask_bts: jax.Array, kh: int, g: int) -> jax.Array:
    """[B, T, S] -> [B, K, G*T, S], the rows of `_heads_major`."""
    b, t, s = mask_bts.shape
    return jnp.broadcast_to(mask_bts[:, None, None], (b, kh, g, t, s)).reshape(b, kh, g * t, s)


def _dense_forward(q_btnh, k_bksh, v_bksh, mask_bts, scale):
    """Output [B, T, N, H_v] and the probabilities [B, K, G*T, S] (v's dtype)."""
    t, n = q_btnh.shape[1], q_btnh.shape[2]
    kh = k_bksh.shape[1]
    q_bkqh = _heads_major(q_btnh, kh)
    scores = jnp.einsum("bkqh,bksh->bkqs", q_bkqh, k_bksh, preferred_element_type=jnp.float32)
    scores = jnp.where(_group_rows(mask_bts, kh, n // kh), scores * scale,
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksh.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v_bksh)
    return _tokens_major(out, t), probs


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense(q_btnh, k_bksh, v_bksh, mask_bts, scale):
    return _dense_forward(q_btnh, k_bksh, v_bksh, mask_bts, scale)[0]


def _dense_fwd(q_btnh, k_bksh, v_bksh, mask_bts, scale):
    out, probs = _dense_forward(q_btnh, k_bksh, v_bksh, mask_bts, scale)
    return out, (q_btnh, k_bksh, v_bksh, mask_bts, probs)


def _dense_bwd(scale, residuals, d_out_btnh):
    """The softmax backward written out, every [B, K, G*T, S] tensor used in the layout it was
    made in: dK and dV come out transposed ([B, K, H, S], the probabilities as the untransposed
    right operand), so XLA:CPU copies only the small [.., H] operands. Autodiff of the forward
    transposed the score gradients instead: 141 vs 84 ms at SmolLM2's attention (batch 4 x 512,
    9 query and 3 kv heads, 2 cores)."""
    q_btnh, k_bksh, v_bksh, mask_bts, probs = residuals
    t, n, kh = q_btnh.shape[1], q_btnh.shape[2], k_bksh.shape[1]
    q_bkqh, d_out = _heads_major(q_btnh, kh), _heads_major(d_out_btnh, kh)
    p = probs.astype(jnp.float32)
    dv_bkhs = jnp.einsum("bkqh,bkqs->bkhs", d_out, probs, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkqh,bksh->bkqs", d_out, v_bksh, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * scale
    # a hidden key gets no gradient, even in a row that hides every key (there p is uniform)
    ds = jnp.where(_group_rows(mask_bts, kh, n // kh), ds, 0.0).astype(q_btnh.dtype)
    dq = jnp.einsum("bkqs,bksh->bkqh", ds, k_bksh, preferred_element_type=jnp.float32)
    dk_bkhs = jnp.einsum("bkqh,bkqs->bkhs", q_bkqh, ds, preferred_element_type=jnp.float32)
    return (_tokens_major(dq, t).astype(q_btnh.dtype),
            dk_bkhs.transpose(0, 1, 3, 2).astype(k_bksh.dtype),
            dv_bkhs.transpose(0, 1, 3, 2).astype(v_bksh.dtype), None)


_dense.defvjp(_dense_fwd, _dense_bwd)


class AttentionSettings(NamedTuple):
    """A model's attention settings (its config's fields of the same names). `scan_blocks` reads
    them from the config at every forward and hands them to each layer's `attention` call (so a
    config changed on a built model, as training's `student.attention` does, takes effect)."""

    attention: str = "auto"  # a name of `distill.models.settings.ATTENTION`
    context_parallel: str = "all_gather"  # a name of `distill.models.settings.CONTEXT_PARALLEL`

    @classmethod
    def of(cls, cfg) -> AttentionSettings:
        """The settings of a model config."""
        return cls(cfg.attention, cfg.context_parallel)


DEFAULT_SETTINGS = AttentionSettings()


class AttentionCall(NamedTuple):
    """What the path of one attention call depends on, besides the setting and the platform."""

    dtype: Any
    t: int  # queries
    s: int  # keys (cache slots)
    h: int  # query / key head size
    hv: int  # value head size
    packed: bool = False  # the rows hold documents apart by segment ids
    cached: bool = False  # a dense [B, T, S] mask or heads-major keys: the KV-cache step
    context: int = 1  # size of the mesh's `context` axis

    @classmethod
    def of(cls, q_btnh, k, v, mask, kv_layout: str = "bskh") -> AttentionCall:
        """The call of `attention` (q, k and v may be arrays or ShapeDtypeStructs)."""
        full = isinstance(mask, MaskInfo) and kv_layout == "bskh"
        return cls(q_btnh.dtype, q_btnh.shape[1], k.shape[1 if kv_layout == "bskh" else 2],
                   q_btnh.shape[-1], v.shape[-1], packed=full and mask.q_segments is not None,
                   cached=not full, context=context_size())


def attention_path(setting: str, platform: str, call: AttentionCall) -> tuple[str, str]:
    """(path, why) of one attention call: "dense", "blockwise", "context", or a kernel of
    `distill.models.kernels` (with "+interpret" when it runs in the Pallas interpreter because
    `platform` is not the kernel's own). The one rule, in order:

    - the KV-cache step (a dense mask): dense, whatever the setting;
    - a mesh with a `context` axis: context parallelism (blockwise on each device);
    - "dense" and "blockwise": that path;
    - a kernel named explicitly must support the call and the platform (else a DistillError); on
      CPU a Pallas kernel runs in the interpreter (slow: for tests);
    - "auto": CPU -> dense below `BLOCKWISE_MIN_TOKENS` queries, else blockwise; TPU -> splash;
      GPU -> cuDNN for rows without segments in bfloat16 / float16, else the Pallas flash kernel;
      where a kernel does not support the call, and on every other platform -> blockwise, with
      the reasons in `why`.
    """
    if call.cached:
        return "dense", "the KV-cache step reads the cache once"
    if call.context > 1:
        return "context", f"context={call.context}"
    shape = dict(t=call.t, s=call.s, h=call.h, hv=call.hv, packed=call.packed, dtype=call.dtype)
    if setting in ("blockwise", "dense"):
        return setting, f"attention: {setting}"
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
    if platform == "cpu" and call.t < BLOCKWISE_MIN_TOKENS:
        return "dense", f"auto on cpu (below {BLOCKWISE_MIN_TOKENS} tokens)"
    candidates = {"tpu": ("splash",), "gpu": ("cudnn", "pallas_gpu")}.get(platform, ())
    why = []
    for kernel in candidates:
        reason = unsupported(kernel, **shape)
        if reason is None:
            return kernel, f"auto on {platform}" + (f" ({'; '.join(why)})" if why else "")
        why.append(f"not {kernel}: {reason}")
    return "blockwise", f"auto on {platform}" + (f" ({'; '.join(why)})" if why else "")


def attention(q_btnh: jax.Array, k: jax.Array, v: jax.Array, mask, scale: float,
              kv_layout: str = "bskh", settings: AttentionSettings = DEFAULT_SETTINGS,
              ) -> jax.Array:
    """Attention of q [B, T, N, H] over k, v; returns [B, T, N, H_v], by the path
    `attention_path` picks for `settings.attention`.

    mask: a `MaskInfo` (a full-sequence forward; k, v [B, S, K, H]), or the dense [B, T, S] mask
    of a KV-cache step (k, v [B, S, K, H] or, `kv_layout` "bksh", heads-major [B, K, S, H]).
    """
    call = AttentionCall.of(q_btnh, k, v, mask, kv_layout)
    path, why = attention_path(settings.attention, jax.default_backend(), call)
    if path == "dense":
        if not call.cached:
            _log_once(path, f"attention: dense ({why})")
        dense_bts = mask.dense() if isinstance(mask, MaskInfo) else mask
        return dot_product_attention(q_btnh, k, v, dense_bts, scale, kv_layout)
    if path == "context":
        _log_once("context", f"attention: context parallel ({settings.context_parallel}) over "
                  f"context={call.context}, blockwise on each device")
        return context_parallel_attention(q_btnh, k, v, mask, scale, settings.context_parallel)
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
