"""The model families in one place: the config union (the `family` field picks the schema), the
decoder class each config describes, and a model preset file (`configs/{students,teachers}/*.yaml`).

Adding a family: its folder (config, model, HF table), its config in `ModelConfig`, its class
in `model_class`, and its union tags in `distill.config`'s error-location filter.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from flax import nnx
from pydantic import Field

from distill.config import Frozen, load_config
from distill.models.deepseek.config import MoEConfig
from distill.models.deepseek.model import MoEDecoder
from distill.models.llama.config import DenseConfig
from distill.models.llama.model import DenseDecoder

# Any model config; the `family` field picks the schema.
ModelConfig = Annotated[DenseConfig | MoEConfig, Field(discriminator="family")]


class ModelFile(Frozen):
    """A model preset file: `configs/{students,teachers}/*.yaml` holds one `model:` table."""

    model: ModelConfig


def load_model_config(path: str | Path, overrides=()) -> DenseConfig | MoEConfig:
    """Load a model preset YAML (a file with a top-level `model:` table)."""
    return load_config(ModelFile, path, overrides).model


def model_class(cfg) -> type[nnx.Module]:
    """The decoder class a config describes (dense student or MoE teacher)."""
    if isinstance(cfg, MoEConfig):
        return MoEDecoder
    return DenseDecoder


def abstract_model(cfg, model_cls: type[nnx.Module] | None = None) -> nnx.Module:
    """The model with ShapeDtypeStructs in place of arrays (no allocation)."""
    model_cls = model_cls or model_class(cfg)
    return nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0)))


def param_count(cfg) -> int:
    """Number of parameters of the model a config describes (from shapes only)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))


def active_params(cfg) -> tuple[int, int]:
    """(total, active per token) parameters of a model config: a MoE layer uses its shared
    experts and `num_experts_per_tok` of its routed experts per token."""
    total = param_count(cfg)
    if not isinstance(cfg, MoEConfig):
        return total, total
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size  # gate, up, down
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    return total, total - idle
