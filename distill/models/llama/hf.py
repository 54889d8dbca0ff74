"""Hugging Face <-> native for Llama and Qwen2 (`LlamaForCausalLM`, `Qwen2ForCausalLM`):
config.json and the weight table (the machinery and the layouts: `distill.models.weights`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from jax.sharding import Mesh

from distill.config import validate
from distill.errors import DistillError
from distill.models import weights
from distill.models.config import rope_from_hf
from distill.models.llama.config import DenseConfig
from distill.models.llama.model import DenseDecoder

ROWS: tuple[weights.Row, ...] = (
    *weights.decoder_rows("blocks"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blocks.attn.wq_dnh", "t1"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blocks.attn.wk_dkh", "t1"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blocks.attn.wv_dkh", "t1"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.attn.wo_nhd", "t2"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blocks.attn.bq_nh", "flat"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blocks.attn.bk_kh", "flat"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blocks.attn.bv_kh", "flat"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blocks.mlp.w_gate_df", "t1"),
    ("model.layers.{i}.mlp.up_proj.weight", "blocks.mlp.w_up_df", "t1"),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.mlp.w_down_fd", "t1"),
)
TABLE = weights.WeightTable(ROWS)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FAMILY_ARCH = {v: k for k, v in ARCHITECTURES.items()}


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: dict, source: str = "config.json", **runtime) -> DenseConfig:
    """Map a config.json dict to a DenseConfig (runtime fields such as param_dtype via kwargs)."""
    arch = (hf.get("architectures") or [None])[0]
    family = ARCHITECTURES.get(arch) or {"llama": "llama", "qwen2": "qwen2"}.get(hf.get("model_type"))
    if family is None:
        raise DistillError(
            f"{source}: unsupported architecture {arch or hf.get('model_type')!r} "
            f"(supported: {', '.join(ARCHITECTURES)})")
    if hf.get("mlp_bias"):
        raise DistillError(f"{source}: mlp_bias=true is not supported")
    theta, scaling = rope_from_hf(hf)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "sliding_window",
            "use_sliding_window", "max_window_layers")
    data = {k: hf[k] for k in keys if hf.get(k) is not None}
    data["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if isinstance(data.get("eos_token_id"), list):
        data["eos_token_id"] = tuple(data["eos_token_id"])
    data.update(family=family, rope_theta=theta, rope_scaling=scaling,
                attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)))
    data.update(runtime)

    try:
        return validate(DenseConfig, data, source)
    except KeyError as e:
        raise DistillError(f"{source}: missing key {e.args[0]!r}") from None


def config_to_hf(cfg: DenseConfig, torch_dtype: str | None = None) -> dict:
    """A config.json dict that transformers loads as the same architecture."""
    out = {
        "architectures": [FAMILY_ARCH[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling.as_hf() if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "torch_dtype": torch_dtype or cfg.param_dtype,
        "use_cache": True,
    }
    if cfg.pad_token_id is not None:
        out["pad_token_id"] = cfg.pad_token_id
    if cfg.family == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=cfg.use_sliding_window,
                   max_window_layers=cfg.max_window_layers or cfg.num_hidden_layers)
    return out


# ---------------------------------------------------------------------------------------------
# Weights


def weight_table(cfg: DenseConfig) -> weights.WeightTable:
    """The table for this config (one for every Llama / Qwen2 config)."""
    return TABLE


def build_from_tensors(cfg: DenseConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                       mesh: Mesh | None = None) -> DenseDecoder:
    """Assemble a DenseDecoder from a checkpoint's (HF name, array) stream (safetensors, GGUF)."""
    return weights.build_from_tensors(cfg, tensors, source, mesh, table=TABLE,
                                      model_cls=DenseDecoder)
