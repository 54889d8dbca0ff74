"""The DeepSeek-V3 / R1 config (`family: deepseek_v3`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distill.models.config import DecoderConfig


class MoEConfig(DecoderConfig):
    """A DeepSeek-V3 / R1 decoder (MLA attention, shared + routed experts). config.json names.

    Layers [0, first_k_dense_replace) have a dense MLP of `intermediate_size`; the rest a
    DeepSeekMoE block: `n_shared_experts` always-on experts plus `num_experts_per_tok` of
    `n_routed_experts` routed ones, each of width `moe_intermediate_size`. `num_hidden_layers`
    leaves out the MTP layers stored after them (not part of the model).
    """

    family: Literal["deepseek_v3"]
    moe_intermediate_size: int  # F of one expert
    num_key_value_heads: int | None = None  # MLA: always N (kept for config.json fidelity)
    # Multi-head latent attention.
    q_lora_rank: int | None = None  # Q; None = a plain query projection
    kv_lora_rank: int  # C, the cached latent
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # R, the cached shared rope key
    v_head_dim: int
    rope_interleave: bool = True
    # DeepSeekMoE.
    n_routed_experts: int  # E
    n_shared_experts: int = Field(1, ge=1)
    num_experts_per_tok: int  # top-k
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: Literal[1] = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: Literal["sigmoid"] = "sigmoid"
    topk_method: Literal["noaux_tc"] = "noaux_tc"
    num_nextn_predict_layers: int = 0  # MTP layers in the checkpoint (skipped on load)
    # Routed-expert dispatch: "capacity" (sorted [E, C, D] buffer, exact overflow rounds; the
    # gradient replays the rounds), "ragged" (jax.lax.ragged_dot grouped matmuls), "auto" = ragged
    # on GPU/TPU, capacity on CPU (where ragged_dot is several times slower).
    moe_dispatch: Literal["auto", "capacity", "ragged"] = "auto"
    # rows per expert per capacity round: C = factor * tokens * top_k / E. Overflow takes another
    # round (never dropped); 2 makes one round the usual case under a routing imbalance up to 2x.
    moe_capacity_factor: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        n, e, k = self.num_attention_heads, self.n_routed_experts, self.num_experts_per_tok
        if self.num_key_value_heads not in (None, n):
            raise ValueError(f"num_key_value_heads must equal num_attention_heads ({n}) in MLA")
        if e % self.n_group or e // self.n_group < 2:
            raise ValueError(f"n_group ({self.n_group}) must divide n_routed_experts ({e}) "
                             "into groups of at least 2")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}]")
        if not 1 <= k <= self.topk_group * (e // self.n_group):
            raise ValueError(f"num_experts_per_tok ({k}) must be in [1, experts in the kept "
                             f"groups = {self.topk_group * (e // self.n_group)}]")
        if self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even")
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers
