"""Configs: YAML files -> validated, frozen pydantic objects, with `--set a.b=c` overrides.

Every config error becomes a `DistillError` whose one line names the file and the dotted key.

Paths follow one rule (`resolve_path`): a relative path in a config file, in `--set` or on the
command line is relative to the current working directory, and `~` is the home directory. Path
fields are typed `InputPath` (read: must exist when a stage runs) or `OutputPath` (written) and are
made absolute when the config is validated, so a loaded config, and every config distill writes
from one, means the same from any directory.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from distill.errors import DistillError
from distill.fsutil import write_atomic

DTypeName = Literal["float32", "bfloat16", "float16"]
# remat policies (`distill.models.layers.REMAT_POLICIES` implements exactly these)
RematName = Literal["none", "full", "dots", "dots_no_batch"]
# full-sequence attention (`distill.models.attention.choose_attention`): "dense" builds the
# [B, T, S] mask and float32 scores, "blockwise" attends block by block in O(T) memory (online
# softmax, every backend), "splash" (TPU), "cudnn" and "pallas_gpu" (GPU) are fused kernels;
# "auto" = the platform's kernel where it supports the shapes (splash on TPU; cuDNN for unpacked
# bfloat16 rows, else pallas_gpu on GPU), else blockwise, and on CPU dense below 2048 tokens.
# Decoding with the KV cache is dense (it reads the cache once per step). distill-only: never
# written to config.json.
AttentionName = Literal["auto", "dense", "blockwise", "splash", "cudnn", "pallas_gpu"]
# attention over a mesh's `context` axis (`distill.models.context`): gather every device's keys
# and values ("all_gather") or pass them round a ring ("ring").
ContextParallelName = Literal["all_gather", "ring"]


class Frozen(BaseModel):
    """Base of every config object: unknown keys are errors, instances are immutable and hashable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Paths: the one rule

PATH_MISSING = "path_missing"  # the pydantic error type of a missing input path
CHECK_PATHS = "check_paths"  # validation-context key: input paths must exist


def resolve_path(path: str | os.PathLike) -> str:
    """The one rule for a path in a config: `~` expanded, then a relative path joined to the
    current working directory (as for every path on the command line), normalised."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def check_input(path: str, info: ValidationInfo | None) -> str:
    """`path` (resolved), or a validation error naming it when the context asks for existing
    input paths (a stage about to run) and there is nothing there."""
    if info is not None and (info.context or {}).get(CHECK_PATHS) and not os.path.exists(path):
        raise PydanticCustomError(PATH_MISSING, "not found: {path}", {"path": path})
    return path


def _input_path(value: str, info: ValidationInfo) -> str:
    return check_input(resolve_path(value), info)


# A file or folder a stage reads (must exist when the stage runs; `distill plan` does not ask).
InputPath = Annotated[str, AfterValidator(_input_path)]
# A file or folder a stage writes (created when needed).
OutputPath = Annotated[str, AfterValidator(resolve_path)]

# suffixes that make a name a local file even before it exists
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".zst", ".gz", ".txt")


def looks_like_path(source: str) -> bool:
    """Whether a data source that does not exist was meant as a local path, not a hub name
    (`owner/name`): it has no "/" at all, starts with ".", "/", "~" or one of distill's
    artifact roots (teacher_traces/, students/), or ends in a data file suffix."""
    return ("/" not in source or source.startswith((".", "/", "~", "teacher_traces/", "students/"))
            or source.lower().endswith(_DATA_SUFFIXES))


def resolve_source(source: str, info: ValidationInfo | None = None) -> str:
    """A data source: a local path (resolved by the one rule, and checked like an `InputPath`)
    when something is there or it looks like a path; otherwise a Hugging Face hub dataset name,
    kept as it is (`open-r1/OpenR1-Math-220k`)."""
    path = resolve_path(source)
    if not os.path.exists(path) and not looks_like_path(source):
        return source
    return check_input(path, info)


def _data_source(value: str, info: ValidationInfo) -> str:
    if (getattr(info, "data", None) or {}).get("format") == "hub":
        return value  # declared a hub name (a config's `format: hub` field, validated first)
    return resolve_source(value, info)


# A dataset a stage reads: a local file or folder, or a hub dataset name (see resolve_source).
DataSource = Annotated[str, AfterValidator(_data_source)]


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
    remat: RematName = "none"
    attention: AttentionName = "auto"  # see AttentionName
    context_parallel: ContextParallelName = "all_gather"  # see ContextParallelName

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


class MoEConfig(Frozen):
    """A DeepSeek-V3 / R1 decoder (MLA attention, shared + routed experts). config.json names.

    Layers [0, first_k_dense_replace) have a dense MLP of `intermediate_size`; the rest a
    DeepSeekMoE block: `n_shared_experts` always-on experts plus `num_experts_per_tok` of
    `n_routed_experts` routed ones, each of width `moe_intermediate_size`.
    """

    family: Literal["deepseek_v3"]
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F of the dense layers
    moe_intermediate_size: int  # F of one expert
    num_hidden_layers: int  # L (the MTP layers stored after them are not part of the model)
    num_attention_heads: int  # N
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
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Runtime choices (not architecture).
    param_dtype: DTypeName = "float32"
    dtype: DTypeName = "float32"  # compute dtype
    remat: RematName = "none"
    attention: AttentionName = "auto"  # see AttentionName
    context_parallel: ContextParallelName = "all_gather"  # see ContextParallelName
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

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else (e,) if isinstance(e, int) else tuple(e)


# Any model config; the `family` field picks the schema.
ModelConfig = Annotated[DenseConfig | MoEConfig, Field(discriminator="family")]
# union tags (model families, trace source forms, and those `tagged_union` adds: sampler
# kinds), left out of error locations
_UNION_TAGS = {"llama", "qwen2", "deepseek_v3", "source-name", "source-table"}


def tagged_union(members: dict[str, type[BaseModel]], default: str, known: str) -> Any:
    """The type of a table that is one of `members`, picked by its `kind` key (`default` where the
    table has none). An unknown kind is one error, "kind must be <known>"; the tags stay out of
    error locations, so errors name the keys users write."""
    _UNION_TAGS.update(members)

    def kind(value) -> str | None:
        if isinstance(value, dict):
            return value.get("kind", default)
        return getattr(value, "kind", None)

    tagged = tuple(Annotated[cls, Tag(tag)] for tag, cls in members.items())
    return Annotated[Union[tagged], Discriminator(  # noqa: UP007 (a tuple of members)
        kind, custom_error_type="invalid_kind", custom_error_message=f"kind must be {known}")]

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


def validate(schema: type[T], data: dict, source: str, *, check_paths: bool = False) -> T:
    """Validate `data` into `schema`; the first error names the dotted key and `source`.
    `check_paths`: every `InputPath` must exist (a missing one is an error naming its key)."""
    try:
        return schema.model_validate(data, context={CHECK_PATHS: check_paths})
    except ValidationError as e:
        # an unknown key first: a typo shows up as both "unknown" and "missing", and names itself
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        key = ".".join(str(p) for p in err["loc"] if p not in _UNION_TAGS) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing required key"
        elif err["type"] == PATH_MISSING:
            msg = err["msg"]
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise DistillError(f"{source}: {key}: {msg}{more}") from None


def load_config(schema: type[T], path: str | Path, overrides=(), *,
                check_paths: bool = False) -> T:
    """YAML file + `--set` overrides -> frozen, validated `schema` instance (paths resolved by
    `resolve_path`; `check_paths`: every input path must exist)."""
    data = apply_overrides(read_yaml(path), parse_overrides(overrides))
    return validate(schema, data, str(path), check_paths=check_paths)


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write a validated config as YAML, every field included and every path absolute, so it
    means the same when read back from any directory (atomically: a crash leaves the old file)."""
    data = cfg.model_dump(mode="json")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())
    return path


class ModelFile(Frozen):
    """A model preset file: `configs/{students,teachers}/*.yaml` holds one `model:` table."""

    model: ModelConfig


def load_model_config(path: str | Path, overrides=()) -> DenseConfig | MoEConfig:
    """Load a model preset YAML (a file with a top-level `model:` table)."""
    return load_config(ModelFile, path, overrides).model


def read_api_key(env_var: str, purpose: str) -> str:
    """The secret held by environment variable `env_var` (never logged or stored)."""
    key = os.environ.get(env_var, "")
    if not key:
        raise DistillError(f"environment variable {env_var} is not set (it should hold the API "
                           f"key {purpose})")
    return key
