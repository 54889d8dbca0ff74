"""DeepSeek-V3 / R1 decoder (the teacher) in Flax NNX: MLA attention, then a dense MLP in the first
`first_k_dense_replace` layers and a DeepSeekMoE block (shared + routed experts) in the rest.

The two kinds of layer have different parameters, so they are two stacks (leading axis L_dense and
L_moe), each run under its own `jax.lax.scan`. The multi-token-prediction (MTP) layers stored after
the main model in DeepSeek checkpoints are not part of it. Layouts follow transformers'
`DeepseekV3ForCausalLM` up to a transpose (the table in `distill.models.deepseek.hf`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx

from distill.models import layers
from distill.models.decoder import CausalLM, Embed, PreNormBlocks, scan_blocks
from distill.models.deepseek import experts
from distill.models.deepseek.config import MoEConfig
from distill.models.deepseek.mla import MLACache, MLAttention
from distill.models.rope import rope_tables


class MoECache(NamedTuple):
    """MLA caches of the dense stack and the MoE stack (None where a stack has no layers)."""

    dense: MLACache | None
    moe: MLACache | None


class GatedMLP(nnx.Module):
    """SwiGLU of width F over `num_layers` stacked layers (the dense MLP and the shared experts)."""

    def __init__(self, num_layers: int, d: int, f: int, dtype, rngs: nnx.Rngs):
        p = rngs.params
        self.w_gate_df = layers.param(p(), (num_layers, d, f), ("layers", "embed", "mlp"), dtype)
        self.w_up_df = layers.param(p(), (num_layers, d, f), ("layers", "embed", "mlp"), dtype)
        self.w_down_fd = layers.param(p(), (num_layers, f, d), ("layers", "mlp", "embed"), dtype)

    def __call__(self, x_btd):
        return layers.swiglu(x_btd, self.w_gate_df[...], self.w_up_df[...], self.w_down_fd[...])


class MoE(nnx.Module):
    """Router + E routed experts (sharded on "experts") + always-on shared experts; stacked on L."""

    def __init__(self, cfg: MoEConfig, num_layers: int, rngs: nnx.Rngs):
        L, D, E, F = num_layers, cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        dt, p = jnp.dtype(cfg.param_dtype), rngs.params
        # the router stays float32 whatever param_dtype is, like transformers' checkpoints
        self.w_router_de = layers.param(p(), (L, D, E), ("layers", "embed", "routing"), jnp.float32)
        self.router_bias_e = layers.param(p(), (L, E), ("layers", "routing"), jnp.float32, "zeros")
        self.w_gate_edf = layers.param(p(), (L, E, D, F), ("layers", "experts", "embed", "mlp"), dt)
        self.w_up_edf = layers.param(p(), (L, E, D, F), ("layers", "experts", "embed", "mlp"), dt)
        self.w_down_efd = layers.param(p(), (L, E, F, D), ("layers", "experts", "mlp", "embed"), dt)
        self.shared = GatedMLP(L, D, F * cfg.n_shared_experts, dt, rngs)
        # static settings as (name, value) pairs: the graphdef must stay hashable for jit
        self.routing = (("top_k", cfg.num_experts_per_tok), ("n_group", cfg.n_group),
                        ("topk_group", cfg.topk_group), ("norm_topk_prob", cfg.norm_topk_prob),
                        ("scaling", cfg.routed_scaling_factor))
        self.dispatch = (("dispatch", cfg.moe_dispatch), ("capacity_factor", cfg.moe_capacity_factor))

    def __call__(self, x_btd):
        b, t, d = x_btd.shape
        x_md = x_btd.reshape(b * t, d)
        w_mk, idx_mk = experts.route(x_md, self.w_router_de[...], self.router_bias_e[...],
                                     **dict(self.routing))
        y_md = experts.routed_experts(x_md, w_mk, idx_mk, self.w_gate_edf[...], self.w_up_edf[...],
                                      self.w_down_efd[...], **dict(self.dispatch))
        return y_md.reshape(b, t, d) + self.shared(x_btd)


class DecoderBlocks(PreNormBlocks):
    """`num_layers` decoder layers stacked on L: MLA, then a dense MLP or a MoE block."""

    def __init__(self, cfg: MoEConfig, num_layers: int, moe: bool, rngs: nnx.Rngs):
        L, D, dt = num_layers, cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        super().__init__(
            L, D, cfg.rms_norm_eps, dt, lambda: MLAttention(cfg, L, rngs),
            lambda: MoE(cfg, L, rngs) if moe else GatedMLP(L, D, cfg.intermediate_size, dt, rngs),
            rngs)


class MoEDecoder(CausalLM):
    """DeepSeek-V3 causal LM. `model(tokens_bt) -> logits_btv` (float32)."""

    def __init__(self, cfg: MoEConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg, rngs)
        nd, nm = cfg.num_dense_layers, cfg.num_moe_layers
        self.dense_blocks = DecoderBlocks(cfg, nd, False, rngs) if nd else None
        self.moe_blocks = DecoderBlocks(cfg, nm, True, rngs) if nm else None
        self._init_head(cfg, rngs)

    # -- public API -----------------------------------------------------------------------------

    def init_cache(self, batch: int, length: int, dtype=None) -> MoECache:
        """An empty MLA cache (latent and rope key only) for `batch` sequences of `length` slots."""
        c = self.config
        dtype = jnp.dtype(dtype or c.dtype)

        def stack(n):
            if not n:
                return None
            return MLACache(jnp.zeros((n, batch, length, c.kv_lora_rank), dtype),
                            jnp.zeros((n, batch, length, c.qk_rope_head_dim), dtype))

        return MoECache(stack(c.num_dense_layers), stack(c.num_moe_layers))

    # -- internals ------------------------------------------------------------------------------

    def _run(self, tokens_bt, positions_bt, mask_bts, cache, cache_index):
        """Embed, scan the dense stack then the MoE stack, final norm -> hidden [B, T, D], cache."""
        cfg = self.config
        x = self.embed(tokens_bt, jnp.dtype(cfg.dtype))
        rope = rope_tables(positions_bt, cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        caches = (None, None) if cache is None else (cache.dense, cache.moe)
        new = []
        for blocks, stack_cache in zip((self.dense_blocks, self.moe_blocks), caches, strict=True):
            if blocks is None:
                new.append(None)
                continue
            x, stack_cache = self._scan(blocks, x, rope, mask_bts, stack_cache, cache_index)
            new.append(stack_cache)
        cache = None if cache is None else MoECache(*new)
        return layers.rms_norm(x, self.final_norm_d[...], cfg.rms_norm_eps), cache

    def _scan(self, blocks, x_btd, rope, mask_bts, cache: MLACache | None, cache_index):
        kv = None if cache is None else tuple(cache)
        x_btd, kv = scan_blocks(blocks, x_btd, rope, mask_bts, kv, cache_index, self.config)
        return x_btd, None if cache is None else MLACache(*kv)
