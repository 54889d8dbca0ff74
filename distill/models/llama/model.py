"""Dense decoder of the Llama and Qwen2 families (the students), in Flax NNX.

Parameters of all layers are stacked on a leading L axis and the blocks run under `jax.lax.scan`,
so compile time does not grow with depth. Weight layouts follow Hugging Face up to a transpose
(half-split RoPE, unscaled queries), so conversion is the table in `distill.models.llama.hf`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from distill.models import layers, lora, lora_mlp
from distill.models.attention import DEFAULT_SETTINGS, AttentionSettings, attention
from distill.models.decoder import CausalLM, Embed, PreNormBlocks, scan_blocks
from distill.models.llama.config import DenseConfig
from distill.models.quant import weight
from distill.models.rope import apply_rope, rope_tables


class KVCache(NamedTuple):
    """Keys and values of every layer, heads-major: [L, B, K, S, H] each."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias; stacked over L layers."""

    def __init__(self, cfg: DenseConfig, rngs: nnx.Rngs):
        L, D, N, K, H = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.head_size)
        dt = jnp.dtype(cfg.param_dtype)
        self.wq_dnh = layers.param(rngs.params(), (L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), dt)
        self.wk_dkh = layers.param(rngs.params(), (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.wv_dkh = layers.param(rngs.params(), (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.wo_nhd = layers.param(rngs.params(), (L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), dt)
        if cfg.attention_bias:
            self.bq_nh = layers.param(rngs.params(), (L, N, H), ("layers", "q_heads", "head_dim"), dt, "zeros")
            self.bk_kh = layers.param(rngs.params(), (L, K, H), ("layers", "kv_heads", "head_dim"), dt, "zeros")
            self.bv_kh = layers.param(rngs.params(), (L, K, H), ("layers", "kv_heads", "head_dim"), dt, "zeros")
        self.bias = cfg.attention_bias
        self.scale = cfg.head_size**-0.5

    def __call__(self, x_btd, rope, mask_bts, kv=None, cache_index=None,
                 settings: AttentionSettings = DEFAULT_SETTINGS):
        """One layer (called on per-layer slices inside the scan). kv: this layer's ([B,K,S,H]) x 2.

        mask_bts: a `MaskInfo` (a full sequence) or the dense [B, T, S] mask (with a cache);
        settings: the model's, for `attention`."""
        dt = x_btd.dtype
        q = lora.plus_adapter(self, "q", x_btd,
                              jnp.einsum("btd,dnh->btnh", x_btd, weight(self.wq_dnh, dt)))
        k = lora.plus_adapter(self, "k", x_btd,
                              jnp.einsum("btd,dkh->btkh", x_btd, weight(self.wk_dkh, dt)))
        v = lora.plus_adapter(self, "v", x_btd,
                              jnp.einsum("btd,dkh->btkh", x_btd, weight(self.wv_dkh, dt)))
        if self.bias:
            q = q + self.bq_nh[...].astype(dt)
            k = k + self.bk_kh[...].astype(dt)
            v = v + self.bv_kh[...].astype(dt)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            out_btnh = attention(q, k, v, mask_bts, self.scale, settings=settings)
        else:  # write this step's keys/values into the cache, attend over all of it
            k_cache, v_cache = kv
            k = layers.write_slots(k_cache, k.transpose(0, 2, 1, 3), cache_index, axis=2)
            v = layers.write_slots(v_cache, v.transpose(0, 2, 1, 3), cache_index, axis=2)
            kv = (k, v)
            out_btnh = attention(q, k.astype(dt), v.astype(dt), mask_bts, self.scale,
                                 kv_layout="bksh", settings=settings)
        out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, weight(self.wo_nhd, dt))
        return lora.plus_adapter(self, "o", out_btnh, out_btd), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); stacked over L layers."""

    def __init__(self, cfg: DenseConfig, rngs: nnx.Rngs):
        L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        dt = jnp.dtype(cfg.param_dtype)
        self.w_gate_df = layers.param(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), dt)
        self.w_up_df = layers.param(rngs.params(), (L, D, F), ("layers", "embed", "mlp"), dt)
        self.w_down_fd = layers.param(rngs.params(), (L, F, D), ("layers", "mlp", "embed"), dt)

    def __call__(self, x_btd):
        dt = x_btd.dtype
        w_gate, w_up, w_down = (weight(w, dt) for w in (self.w_gate_df, self.w_up_df,
                                                        self.w_down_fd))
        if not lora.has_adapters(self):
            return layers.swiglu(x_btd, w_gate, w_up, w_down)
        # with adapters: the frozen weights get no gradient, the adapters theirs (written out)
        return lora_mlp.swiglu(self, x_btd, w_gate, w_up, w_down)


class Blocks(PreNormBlocks):
    """All decoder blocks, parameters stacked on L; `__call__` runs one layer's slice."""

    def __init__(self, cfg: DenseConfig, rngs: nnx.Rngs):
        super().__init__(cfg.num_hidden_layers, cfg.hidden_size, cfg.rms_norm_eps,
                         jnp.dtype(cfg.param_dtype), lambda: Attention(cfg, rngs),
                         lambda: MLP(cfg, rngs), rngs)


class DenseDecoder(CausalLM):
    """Llama / Qwen2 causal LM. `model(tokens_bt) -> logits_btv` (float32)."""

    cache_slot_axis = 2  # a layer's cache is heads-major [B, K, S, H]

    def __init__(self, cfg: DenseConfig, rngs: nnx.Rngs):
        if cfg.use_sliding_window:
            raise ValueError("sliding-window attention (use_sliding_window: true) is not supported")
        self.config = cfg
        self.embed = Embed(cfg, rngs)
        self.blocks = Blocks(cfg, rngs)
        self._init_head(cfg, rngs)
        if cfg.lora is not None or cfg.quantize != "none":
            lora.adapt(self, cfg.lora, cfg.quantize, rngs.params())

    # -- public API -----------------------------------------------------------------------------

    def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `length` slots."""
        c = self.config
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, length, c.head_size)
        dtype = jnp.dtype(dtype or c.dtype)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    # -- internals ------------------------------------------------------------------------------

    def _run(self, tokens_bt, positions_bt, mask_bts, cache, cache_index):
        """Embed, scan the blocks, final norm. Returns hidden [B, T, D] and the cache."""
        cfg = self.config
        x = self.embed(tokens_bt, jnp.dtype(cfg.dtype))
        rope = rope_tables(positions_bt, cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = scan_blocks(self.blocks, x, rope, mask_bts, kv, cache_index, cfg,
                            slot_axis=self.cache_slot_axis)
        cache = None if cache is None else KVCache(*kv)
        return layers.rms_norm(x, self.final_norm_d[...], cfg.rms_norm_eps), cache
