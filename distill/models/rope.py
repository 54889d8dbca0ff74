"""Rotary position embeddings, as Hugging Face computes them (half-split rotation): the default,
linear, Llama-3 and YaRN frequency schedules.

Dimension alphabet: B batch, T query length, S key/cache length, D model width, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head size, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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


def rope_tables(positions_bt: jax.Array, head_dim: int, theta: float, scaling=None):
    """(cos, sin) [B, T, head_dim] for these positions, from a config's `rope_theta` and
    `rope_scaling` (a `distill.models.config.RopeScaling` or None)."""
    inv_freq, factor = rope_inv_freq(head_dim, theta, scaling.as_hf() if scaling else None)
    return rope_cos_sin(positions_bt, inv_freq, factor)
