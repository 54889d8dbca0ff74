"""Hugging Face <-> native for DeepSeek-V3 / R1 (`DeepseekV3ForCausalLM`): config.json and weights.

The weight table uses the machinery of `distill.models.weights`: `{stack}` stands for the dense stack
(HF layers [0, first_k_dense_replace)) and the MoE stack (the rest); `{e}` is the expert index,
stacked on the axis after L. Before the table sees them, the tensor stream is normalised:
  - MTP layers (`model.layers.{num_hidden_layers + j}.*`) are skipped, as transformers does;
  - FP8 e4m3 weights are multiplied out with their `weight_scale_inv` block scales (DeepSeek's
    published layout: one float32 scale per 128 x 128 block, [ceil(out/128), ceil(in/128)]),
    lazily: a part of the product reads only its part of the weight and the scales of its blocks;
  - fused experts (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F], the
    in-memory layout of transformers 5) are split into the per-expert tensors that checkpoints
    (DeepSeek's and transformers' `save_pretrained`) hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from distill.config import validate
from distill.errors import DistillError
from distill.models import weights
from distill.models.config import rope_from_hf
from distill.models.deepseek.config import MoEConfig
from distill.models.deepseek.model import MoEDecoder
from distill.models.lazy import Index, LazyTensor, full_index, outer_take

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"

_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
ROWS: tuple[weights.Row, ...] = (
    *weights.decoder_rows("{stack}"),
    (_ATTN + "q_proj.weight", "{stack}.attn.wq_dnh", "t1"),
    (_ATTN + "q_a_proj.weight", "{stack}.attn.wq_a_dq", "t1"),
    (_ATTN + "q_a_proj.bias", "{stack}.attn.bq_a_q", "same"),
    (_ATTN + "q_a_layernorm.weight", "{stack}.attn.q_norm_q", "same"),
    (_ATTN + "q_b_proj.weight", "{stack}.attn.wq_b_qnh", "t1"),
    (_ATTN + "kv_a_proj_with_mqa.weight", "{stack}.attn.wkv_a_dc", "t1"),
    (_ATTN + "kv_a_proj_with_mqa.bias", "{stack}.attn.bkv_a_c", "same"),
    (_ATTN + "kv_a_layernorm.weight", "{stack}.attn.kv_norm_c", "same"),
    (_ATTN + "kv_b_proj.weight", "{stack}.attn.wkv_b_cnh", "t1"),
    (_ATTN + "o_proj.weight", "{stack}.attn.wo_nhd", "t2"),
    (_ATTN + "o_proj.bias", "{stack}.attn.bo_d", "same"),
    # dense layers
    (_MLP + "gate_proj.weight", "{stack}.mlp.w_gate_df", "t1"),
    (_MLP + "up_proj.weight", "{stack}.mlp.w_up_df", "t1"),
    (_MLP + "down_proj.weight", "{stack}.mlp.w_down_fd", "t1"),
    # MoE layers
    (_MLP + "gate.weight", "{stack}.mlp.w_router_de", "t1"),
    (_MLP + "gate.e_score_correction_bias", "{stack}.mlp.router_bias_e", "same"),
    (_MLP + "experts.{e}.gate_proj.weight", "{stack}.mlp.w_gate_edf", "t1"),
    (_MLP + "experts.{e}.up_proj.weight", "{stack}.mlp.w_up_edf", "t1"),
    (_MLP + "experts.{e}.down_proj.weight", "{stack}.mlp.w_down_efd", "t1"),
    (_MLP + "shared_experts.gate_proj.weight", "{stack}.mlp.shared.w_gate_df", "t1"),
    (_MLP + "shared_experts.up_proj.weight", "{stack}.mlp.shared.w_up_df", "t1"),
    (_MLP + "shared_experts.down_proj.weight", "{stack}.mlp.shared.w_down_fd", "t1"),
)


def weight_table(cfg: MoEConfig) -> weights.WeightTable:
    """The table for this config: which HF layers land in the dense and the MoE stack."""
    return weights.WeightTable(ROWS, stacks=(("dense_blocks", 0), ("moe_blocks", cfg.num_dense_layers)))


def is_moe(config_json: dict) -> bool:
    """Whether a config.json describes a DeepSeek-V3 model."""
    arch = (config_json.get("architectures") or [None])[0]
    return arch == ARCHITECTURE or (arch is None and config_json.get("model_type") == MODEL_TYPE)


# ---------------------------------------------------------------------------------------------
# config.json

_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
         "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave",
         "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
         "first_k_dense_replace", "moe_layer_freq", "routed_scaling_factor", "norm_topk_prob",
         "scoring_func", "topk_method", "max_position_embeddings", "rms_norm_eps",
         "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id")


# transformers' DeepseekV3Config defaults (DeepSeek-V3's values), for keys a config.json leaves out
_HF_DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
    first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096, rms_norm_eps=1e-6,
    bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, rope_interleave=True,
    attention_bias=False)
_NULLABLE = ("q_lora_rank", "bos_token_id", "eos_token_id", "pad_token_id", "num_key_value_heads")


def config_from_hf(config_json: dict, source: str = "config.json", **runtime) -> MoEConfig:
    """Map a DeepseekV3 config.json dict to a MoEConfig (runtime fields via kwargs)."""
    if config_json.get("hidden_act", "silu") != "silu":
        raise DistillError(f"{source}: hidden_act {config_json['hidden_act']!r} is not supported (silu)")
    quantization_block(config_json, source)  # reject an unknown quantization before any loading
    theta, scaling = rope_from_hf(config_json)
    data = dict(_HF_DEFAULTS)
    data.update({k: config_json[k] for k in _KEYS
                 if k in config_json and (config_json[k] is not None or k in _NULLABLE)})
    if isinstance(data.get("eos_token_id"), list):
        data["eos_token_id"] = tuple(data["eos_token_id"])
    mtp = config_json.get("num_nextn_predict_layers", config_json.get("num_mtp_layers", 0))
    data.update(family="deepseek_v3", rope_theta=theta, rope_scaling=scaling,
                num_nextn_predict_layers=mtp or 0)
    data.update(runtime)
    return validate(MoEConfig, data, source)


def config_to_hf(cfg: MoEConfig, torch_dtype: str | None = None) -> dict:
    """A config.json dict that transformers loads as the same DeepseekV3ForCausalLM."""
    out = {k: getattr(cfg, k) for k in _KEYS if k not in ("scoring_func", "topk_method")}
    out.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, hidden_act="silu",
               num_key_value_heads=cfg.num_attention_heads, rope_theta=cfg.rope_theta,
               rope_scaling=cfg.rope_scaling.as_hf() if cfg.rope_scaling else None,
               num_nextn_predict_layers=cfg.num_nextn_predict_layers,
               torch_dtype=torch_dtype or cfg.param_dtype, use_cache=True)
    if isinstance(cfg.eos_token_id, tuple):
        out["eos_token_id"] = list(cfg.eos_token_id)
    return out


def quantization_block(config_json: dict, source: str) -> tuple[int, int] | None:
    """The FP8 weight block size from `quantization_config`, None when unquantized.

    Only DeepSeek's FP8 e4m3 with block scales is understood; anything else is an error.
    """
    q = config_json.get("quantization_config")
    if not q:
        return None
    method, fmt = q.get("quant_method"), q.get("fmt", "e4m3")  # transformers' own FP8 omits fmt
    if method != "fp8" or fmt != "e4m3":
        raise DistillError(f"{source}: unsupported quantization_config (quant_method={method!r}, "
                           f"fmt={fmt!r}); only fp8 e4m3 block-scaled weights load")
    block = q.get("weight_block_size") or [128, 128]
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise DistillError(f"{source}: quantization_config.weight_block_size {block!r} "
                           "should be two positive integers")
    return int(block[0]), int(block[1])


# ---------------------------------------------------------------------------------------------
# Weights

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_SCALE = "_scale_inv"


def skip_mtp(cfg: MoEConfig, tensors: Iterable[tuple[str, np.ndarray]]):
    """Drop the multi-token-prediction layers stored after the main model."""
    mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    for name, array in tensors:
        m = _LAYER.match(name)
        if m and int(m.group(1)) in mtp:
            continue
        yield name, array


def dequantize_fp8(tensors: Iterable[tuple[str, np.ndarray]], block: tuple[int, int],
                   source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Replace each FP8 e4m3 weight and its `weight_scale_inv` by the float32 product.

    A weight and its scale may come in either order; each waits for the other.
    """
    weights: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    for name, array in tensors:
        if name.endswith(".weight" + _SCALE):
            base = name[: -len(_SCALE)]
            if base in weights:
                yield base, _dequantize(base, weights.pop(base), array, block, source)
            else:
                scales[base] = array
        elif array.dtype == _E4M3:
            if name in scales:
                yield name, _dequantize(name, array, scales.pop(name), block, source)
            else:
                weights[name] = array
        elif str(array.dtype).startswith("float8"):
            raise DistillError(f"{source}: tensor {name!r} has unsupported dtype {array.dtype} "
                               "(FP8 weights must be e4m3)")
        else:
            yield name, array
    if weights:
        raise DistillError(f"{source}: FP8 tensor {next(iter(weights))!r} has no weight_scale_inv")
    if scales:
        raise DistillError(f"{source}: tensor {next(iter(scales)) + _SCALE!r} scales no FP8 weight")


def _dequantize(name: str, w, scale_inv, block: tuple[int, int], source: str) -> Dequantized:
    """w (e4m3) [O, I] times its block scale [ceil(O/bo), ceil(I/bi)] -> float32 [O, I], lazily."""
    if len(w.shape) != 2:
        raise DistillError(f"{source}: FP8 tensor {name!r} has {len(w.shape)} dims, expected 2")
    (o, i), (bo, bi) = w.shape, block
    expect = (math.ceil(o / bo), math.ceil(i / bi))
    if tuple(scale_inv.shape) != expect:
        raise DistillError(f"{source}: {name + _SCALE!r} has shape {tuple(scale_inv.shape)}, "
                           f"expected {expect} for a {(o, i)} weight in {bo}x{bi} blocks")
    return Dequantized(w, scale_inv, block)


class Dequantized(LazyTensor):
    """An FP8 weight times its block scales, float32; a part reads its part of the weight and
    the scales of the blocks it touches (arrays or lazy tensors alike)."""

    def __init__(self, w, scale_inv, block: tuple[int, int]):
        self.w, self.scale_inv, self.block = w, scale_inv, block
        self.shape, self.dtype = tuple(w.shape), np.dtype(np.float32)

    def read(self, index: Index | None = None) -> np.ndarray:
        rows, cols = full_index(self.shape) if index is None else index
        (bo, bi), w = self.block, _take(self.w, (rows, cols))
        # each element's block; the scales of the blocks touched, read once each
        (br, inv_r), (bc, inv_c) = (np.unique(rows // bo, return_inverse=True),
                                    np.unique(cols // bi, return_inverse=True))
        s = np.asarray(_take(self.scale_inv, (br, bc)), np.float32)
        return w.astype(np.float32) * s[inv_r][:, inv_c]


def _take(x, index: Index) -> np.ndarray:
    return x.read(index) if isinstance(x, LazyTensor) else outer_take(x, index)


def split_fused_experts(tensors: Iterable[tuple[str, np.ndarray]]):
    """transformers-5 fused expert tensors -> the per-expert tensors of the checkpoint layout."""
    for name, array in tensors:
        m = _FUSED.match(name)
        if not m:
            yield name, array
            continue
        prefix, kind = m.groups()
        for e in range(array.shape[0]):
            if kind == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", array[e]
            else:  # [2F, D]: gate rows first, then up (transformers chunks the output in two)
                f = array.shape[1] // 2
                yield f"{prefix}.{e}.gate_proj.weight", array[e, :f]
                yield f"{prefix}.{e}.up_proj.weight", array[e, f:]


def build_from_tensors(cfg: MoEConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str,
                       mesh: Mesh | None = None, block: tuple[int, int] | None = None) -> MoEDecoder:
    """Assemble a MoEDecoder from a DeepseekV3 checkpoint's (name, array) stream.

    block: the FP8 weight block size from `quantization_block` (default 128 x 128 when the
    checkpoint holds FP8 weights without saying).
    """
    stream = skip_mtp(cfg, tensors)
    stream = dequantize_fp8(stream, block or (128, 128), source)
    stream = split_fused_experts(stream)
    return weights.build_from_tensors(cfg, stream, source, mesh, table=weight_table(cfg),
                                 model_cls=MoEDecoder)
