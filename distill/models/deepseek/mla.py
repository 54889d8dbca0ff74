"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, parameters stacked on a leading L axis.

Keys and values of all N heads come from one compressed latent per token (C = kv_lora_rank, after
its RMSNorm) plus one rope key shared by all heads (R = qk_rope_head_dim). Only those two are
cached, (C + R) numbers per token and layer instead of N * (H_k + H_v).

Extra dimension letters: Q query latent (q_lora_rank), C kv latent, R rope width. The head widths
differ per projection and are named where used: P = qk_nope_head_dim, H_v = v_head_dim.
Layouts follow transformers' `DeepseekV3Attention` up to a transpose (see `distill.models.deepseek.hf`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models import layers
from distill.models.attention import (
    DEFAULT_SETTINGS,
    AttentionCall,
    AttentionSettings,
    MaskInfo,
    attention,
    attention_path,
)
from distill.models.deepseek.config import MoEConfig
from distill.models.rope import apply_rope, yarn_mscale


class MLACache(NamedTuple):
    """The cached latents of a stack of layers: latent [L, B, S, C], rope key [L, B, S, R]."""

    latent: jax.Array
    k_rope: jax.Array


def softmax_scale(cfg: MoEConfig) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 as transformers applies it."""
    scale = cfg.qk_head_dim**-0.5
    s = cfg.rope_scaling
    if s is not None and s.rope_type != "default" and s.mscale_all_dim:
        m = yarn_mscale(s.factor, s.mscale_all_dim)
        scale *= m * m
    return scale


def deinterleave(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's interleaved rope pairs in
    the half-split layout `apply_rope` rotates (transformers' `rope_interleave`)."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


class MLAttention(nnx.Module):
    """MLA over `num_layers` stacked layers; `__call__` runs one layer's slice inside a scan."""

    def __init__(self, cfg: MoEConfig, num_layers: int, rngs: nnx.Rngs):
        L, D, N = num_layers, cfg.hidden_size, cfg.num_attention_heads
        Q, C, R = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        P, Hv = cfg.qk_nope_head_dim, cfg.v_head_dim
        dt = jnp.dtype(cfg.param_dtype)
        p = rngs.params
        if Q:
            self.wq_a_dq = layers.param(p(), (L, D, Q), ("layers", "embed", "q_lora"), dt)
            self.q_norm_q = layers.param(p(), (L, Q), ("layers", "norm"), dt, "ones")
            self.wq_b_qnh = layers.param(p(), (L, Q, N, P + R), ("layers", "q_lora", "q_heads", "head_dim"), dt)
        else:
            self.wq_dnh = layers.param(p(), (L, D, N, P + R), ("layers", "embed", "q_heads", "head_dim"), dt)
        # one projection makes the latent and the shared rope key: [D, C + R], split at use
        self.wkv_a_dc = layers.param(p(), (L, D, C + R), ("layers", "embed", "kv_lora"), dt)
        self.kv_norm_c = layers.param(p(), (L, C), ("layers", "norm"), dt, "ones")
        self.wkv_b_cnh = layers.param(p(), (L, C, N, P + Hv), ("layers", "kv_lora", "q_heads", "head_dim"), dt)
        self.wo_nhd = layers.param(p(), (L, N, Hv, D), ("layers", "q_heads", "head_dim", "embed"), dt)
        if cfg.attention_bias:
            if Q:
                self.bq_a_q = layers.param(p(), (L, Q), ("layers", "q_lora"), dt, "zeros")
            self.bkv_a_c = layers.param(p(), (L, C + R), ("layers", "kv_lora"), dt, "zeros")
            self.bo_d = layers.param(p(), (L, D), ("layers", "embed"), dt, "zeros")
        self.q_lora = bool(Q)
        self.bias = cfg.attention_bias
        self.interleave = cfg.rope_interleave
        self.eps = cfg.rms_norm_eps
        self.widths = (C, P, R, Hv)
        self.scale = softmax_scale(cfg)

    def __call__(self, x_btd, rope, mask_bts, cache=None, cache_index=None,
                 settings: AttentionSettings = DEFAULT_SETTINGS):
        """One layer. cache: this layer's (latent [B, S, C], k_rope [B, S, R]) or None; mask_bts:
        a `MaskInfo` (a full sequence) or the dense [B, T, S] mask (with a cache); settings: the
        model's, for `attention`.

        Returns [B, T, D] and the updated cache.
        """
        dt = x_btd.dtype
        C, P, R, Hv = self.widths
        q_btnh = self._queries(x_btd)
        q_nope, q_rope = q_btnh[..., :P], q_btnh[..., P:]
        kv_btc = jnp.einsum("btd,dc->btc", x_btd, self.wkv_a_dc[...].astype(dt))
        if self.bias:
            kv_btc = kv_btc + self.bkv_a_c[...].astype(dt)
        latent_btc = layers.rms_norm(kv_btc[..., :C], self.kv_norm_c[...], self.eps)
        k_rope_btr = kv_btc[..., C:]
        if self.interleave:
            q_rope, k_rope_btr = deinterleave(q_rope), deinterleave(k_rope_btr)
        cos, sin = rope
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope_btr = apply_rope(k_rope_btr[:, :, None, :], cos, sin)[:, :, 0, :]
        if cache is not None:  # write this step's latents into the cache, attend over all of it
            lat_c, rope_c = cache
            latent_btc = layers.write_slots(lat_c, latent_btc, cache_index, axis=1)
            k_rope_btr = layers.write_slots(rope_c, k_rope_btr, cache_index, axis=1)
            cache = (latent_btc, k_rope_btr)
            latent_btc, k_rope_btr = latent_btc.astype(dt), k_rope_btr.astype(dt)
        # only where the path is dense may attention run in latent space: every other path needs
        # per-head keys, and the absorbed one builds the [B, N, T, S] float32 scores they avoid
        if self._absorbs(q_btnh, latent_btc.shape[1], mask_bts, settings):
            out_btnh = self._absorbed(q_nope, q_rope, latent_btc, k_rope_btr,
                                      mask_bts.dense() if isinstance(mask_bts, MaskInfo) else mask_bts)
        else:
            out_btnh = self._expanded(q_nope, q_rope, latent_btc, k_rope_btr, mask_bts, settings)
        out = jnp.einsum("btnh,nhd->btd", out_btnh, self.wo_nhd[...].astype(dt))
        if self.bias:
            out = out + self.bo_d[...].astype(dt)
        return out, cache

    # -- internals ------------------------------------------------------------------------------

    def _queries(self, x_btd):
        """[B, T, N, P + R]: through the query latent (with its norm) when q_lora_rank is set."""
        dt = x_btd.dtype
        if not self.q_lora:
            return jnp.einsum("btd,dnh->btnh", x_btd, self.wq_dnh[...].astype(dt))
        q_btq = jnp.einsum("btd,dq->btq", x_btd, self.wq_a_dq[...].astype(dt))
        if self.bias:
            q_btq = q_btq + self.bq_a_q[...].astype(dt)
        q_btq = layers.rms_norm(q_btq, self.q_norm_q[...], self.eps)
        return jnp.einsum("btq,qnh->btnh", q_btq, self.wq_b_qnh[...].astype(dt))

    def _absorbs(self, q_btnh, s: int, mask_bts, settings: AttentionSettings) -> bool:
        """Whether to attend in latent space: `attention_path` picks the dense path for the
        expanded call and absorbing costs fewer FLOPs."""
        C, P, R, Hv = self.widths
        b, t, n, _ = q_btnh.shape
        k = jax.ShapeDtypeStruct((b, s, n, P + R), q_btnh.dtype)
        v = jax.ShapeDtypeStruct((b, s, n, Hv), q_btnh.dtype)
        call = AttentionCall.of(q_btnh, k, v, mask_bts)
        dense = attention_path(settings.attention, jax.default_backend(), call)[0] == "dense"
        return dense and _absorb_is_cheaper(t, s, C, P, R, Hv)

    def _expanded(self, q_nope, q_rope, latent_bsc, k_rope_bsr, mask_bts, settings):
        """Expand the latents into per-head keys and values, then plain attention (long queries)."""
        P = self.widths[1]
        kv_bsnh = jnp.einsum("bsc,cnh->bsnh", latent_bsc, self.wkv_b_cnh[...].astype(latent_bsc.dtype))
        k_nope, v_bsnh = kv_bsnh[..., :P], kv_bsnh[..., P:]
        k_rope = jnp.broadcast_to(k_rope_bsr[:, :, None, :], (*k_nope.shape[:3], k_rope_bsr.shape[-1]))
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, k_rope], axis=-1)
        return attention(q, k, v_bsnh, mask_bts, self.scale, settings=settings)

    def _absorbed(self, q_nope, q_rope, latent_bsc, k_rope_bsr, mask_bts):
        """Attend in latent space: the key/value up-projections fold into the query and the
        output, so the cache is never expanded (few queries over a long cache, i.e. decode)."""
        dt = q_nope.dtype
        P = self.widths[1]
        w_cnh = self.wkv_b_cnh[...].astype(dt)
        q_btnc = jnp.einsum("btnp,cnp->btnc", q_nope, w_cnh[..., :P])
        scores = (jnp.einsum("btnc,bsc->bnts", q_btnc, latent_bsc, preferred_element_type=jnp.float32)
                  + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope_bsr, preferred_element_type=jnp.float32))
        scores = jnp.where(mask_bts[:, None], scores * self.scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o_btnc = jnp.einsum("bnts,bsc->btnc", probs, latent_bsc)
        return jnp.einsum("btnc,cnh->btnh", o_btnc, w_cnh[..., P:])


def _absorb_is_cheaper(t: int, s: int, C: int, P: int, R: int, Hv: int) -> bool:
    """FLOPs per head: expanding costs S*(C*(P+Hv) + T*(P+R+Hv)), absorbing T*(C*(P+Hv) + S*(2C+R))."""
    return t * (C * (P + Hv) + s * (2 * C + R)) < s * (C * (P + Hv) + t * (P + R + Hv))
