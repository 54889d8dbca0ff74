"""Configs: YAML files -> validated, frozen pydantic objects, with `--set a.b=c` overrides.

Every config error becomes a `DistillError` whose one line names the file and the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from distill.errors import DistillError

DTypeName = Literal["float32", "bfloat16", "float16"]


class Frozen(BaseModel):
    """Base of every config object: unknown keys are errors, instances are immutable and hashable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class DenseConfig(Frozen):
    """A Llama / Qwen2 decoder. Architecture fields keep their config.json names."""

    family: Literal["llama", "qwen2"]
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K
    head_dim: int | None = None  # H; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (always on for Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Qwen2 sliding-window fields: kept for export; a window in use is not supported.
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int | None = None
    # Runtime choices (not architecture).
    param_dtype: DTypeName = "float32"
    dtype: DTypeName = "float32"  # compute dtype
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"

    @field_validator("num_key_value_heads")
    @classmethod
    def _kv_divides(cls, k: int, info) -> int:
        n = info.data.get("num_attention_heads")
        if n is not None and n % k:
            raise ValueError(f"num_attention_heads ({n}) must be a multiple of it ({k})")
        return k

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)


ModelConfig = DenseConfig  # the MoE teacher config joins this union when it lands

T = TypeVar("T", bound=BaseModel)


# ---------------------------------------------------------------------------------------------
# Loading


def parse_overrides(items: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    """`a.b=c` strings -> (dotted key, YAML-parsed value)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DistillError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.dtype=bfloat16")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Return a copy of `data` with each dotted key set (intermediate tables are created)."""
    data = copy.deepcopy(data)
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise DistillError(f"--set {key}: {part!r} is not a table")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise DistillError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(schema: type[T], data: dict, source: str) -> T:
    """Validate `data` into `schema`; the first error names the dotted key and `source`."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        # an unknown key first: a typo shows up as both "unknown" and "missing", and names itself
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing required key"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise DistillError(f"{source}: {key}: {msg}{more}") from None


def load_config(schema: type[T], path: str | Path, overrides=()) -> T:
    """YAML file + `--set` overrides -> frozen, validated `schema` instance."""
    data = apply_overrides(read_yaml(path), parse_overrides(overrides))
    return validate(schema, data, str(path))


class ModelFile(Frozen):
    """A model preset file: `configs/students/*.yaml` holds one `model:` table."""

    model: DenseConfig


def load_model_config(path: str | Path, overrides=()) -> DenseConfig:
    """Load a model preset YAML (a file with a top-level `model:` table)."""
    return load_config(ModelFile, path, overrides).model
