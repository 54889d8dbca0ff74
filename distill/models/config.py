"""What every model config shares: the runtime setting names, HF `rope_scaling`, and
`DecoderConfig`, the fields a Llama / Qwen2 (`distill.models.llama.config`) and a DeepSeek-V3
(`distill.models.deepseek.config`) config both have. Architecture fields keep their config.json
names; the union of the families and preset loading are `distill.models.families`.
"""

from __future__ import annotations

from typing import Literal

from distill.config import Frozen
from distill.models.settings import ATTENTION, CONTEXT_PARALLEL

DTypeName = Literal["float32", "bfloat16", "float16"]
# remat policies (`distill.models.layers.REMAT_POLICIES` implements exactly these)
RematName = Literal["none", "full", "dots", "dots_no_batch"]
# the names of `distill.models.settings.ATTENTION` (`distill.models.attention.attention_path`
# turns one into the path of a call)
AttentionName = Literal[tuple(ATTENTION)]  # type: ignore[valid-type]
# the names of `distill.models.settings.CONTEXT_PARALLEL` (`distill.models.context`)
ContextParallelName = Literal[tuple(CONTEXT_PARALLEL)]  # type: ignore[valid-type]


class RopeScaling(Frozen):
    """HF `rope_scaling` (the keys transformers reads; unused ones stay None)."""

    rope_type: Literal["default", "linear", "llama3", "yarn"] = "default"
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def as_hf(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling dict or None) from config.json, old or transformers >= 5 style."""
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 nests theta and scaling here
    theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope or None
    if scaling:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
        known = set(RopeScaling.model_fields)
        scaling = {k: v for k, v in scaling.items() if k in known}
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling


class DecoderConfig(Frozen):
    """The fields of every decoder config; a family's subclass narrows `family` to its tags and
    adds its own (the fields keep this order in dumps, a family's own after them)."""

    family: str  # the union tag: each family's subclass narrows it to a Literal
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F (of the dense MLP layers)
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (always on for Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime choices (not architecture).
    param_dtype: DTypeName = "float32"
    dtype: DTypeName = "float32"  # compute dtype
    remat: RematName = "none"
    attention: AttentionName = "auto"  # see AttentionName
    context_parallel: ContextParallelName = "all_gather"  # see ContextParallelName

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)
