"""Pieces shared by the dense students and the MoE teacher: parameters, norms, rotary embeddings,
attention, the gated MLP and the named remat policies.

Dimension alphabet: B batch, T query length, S key/cache length, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head size, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
# Gated MLP


def swiglu(x_btd: jax.Array, w_gate_df: jax.Array, w_up_df: jax.Array, w_down_fd: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)) over the last axis of x, in x's dtype."""
    dt = x_btd.dtype
    gate = jnp.einsum("...d,df->...f", x_btd, w_gate_df.astype(dt))
    up = jnp.einsum("...d,df->...f", x_btd, w_up_df.astype(dt))
    return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down_fd.astype(dt))


# ---------------------------------------------------------------------------------------------
# Remat


REMAT_POLICIES: dict[str, Callable | None] = {
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


def scan_blocks(blocks: nnx.Module, x_btd, rope, mask_bts, kv, cache_index, policy: str,
                slot_axis: int = 1):
    """Run stacked blocks (params on a leading L axis) under `lax.scan`.

    kv: None, or a tuple of caches stacked on L whose per-layer slices hold the cache slots on
    `slot_axis` (1 for [B, S, ...], 2 for heads-major [B, K, S, H]). Each layer reads its cache
    slice and hands back only its T new entries; they are written into the stacked caches once,
    after the scan (in place inside the decode loop), instead of the scan re-stacking whole caches.
    Returns the hidden state and the updated caches (None without a cache).
    """
    graphdef, stacked = nnx.split(blocks)
    if kv is None:
        def plain(x_btd, state):
            return nnx.merge(graphdef, state)(x_btd, rope, mask_bts, None, None)[0], None

        return jax.lax.scan(remat(plain, policy), x_btd, stacked)[0], None
    t = x_btd.shape[1]

    def body(x_btd, layer):
        state, kv_i = layer
        x_btd, kv_i = nnx.merge(graphdef, state)(x_btd, rope, mask_bts, kv_i, cache_index)
        new = tuple(jax.lax.dynamic_slice_in_dim(u, cache_index, t, axis=slot_axis) for u in kv_i)
        return x_btd, new

    x_btd, new = jax.lax.scan(remat(body, policy), x_btd, (stacked, tuple(kv)))
    start = tuple(cache_index if a == slot_axis + 1 else 0 for a in range(kv[0].ndim))
    return x_btd, tuple(jax.lax.dynamic_update_slice(c, u, start)
                        for c, u in zip(kv, new, strict=True))


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
    `init_cache(batch, length)`.
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
        mask = attention_mask(slots_bt, slots_bt, valid_bs, segment_ids_bt, segment_ids_bt)
        return self._run(tokens_bt, positions_bt, mask, None, None)[0]

    def forward_cached(self, tokens_bt, positions_bt, cache, cache_index, kv_valid_bs):
        """Run T new tokens that occupy cache slots [cache_index, cache_index + T).

        kv_valid_bs [B, S] marks the cache slots that hold real tokens (left padding is False).
        Returns float32 logits [B, T, V] and the updated cache.
        """
        b, t = tokens_bt.shape
        s = kv_valid_bs.shape[1]
        q_slots = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        k_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = attention_mask(q_slots, k_slots, kv_valid_bs)
        hidden, cache = self._run(tokens_bt, positions_bt, mask, cache, cache_index)
        return self.logits(hidden), cache

    def logits(self, hidden_btd):
        """Final projection to float32 logits [B, T, V]."""
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden_btd)
        return jnp.einsum("btd,dv->btv", hidden_btd, self.lm_head_dv[...].astype(hidden_btd.dtype),
                          preferred_element_type=jnp.float32)
