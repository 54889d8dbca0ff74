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
from typing import Annotated, Any, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Tag,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from distill.errors import DistillError
from distill.fsutil import write_atomic


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


def read_api_key(env_var: str, purpose: str) -> str:
    """The secret held by environment variable `env_var` (never logged or stored)."""
    key = os.environ.get(env_var, "")
    if not key:
        raise DistillError(f"environment variable {env_var} is not set (it should hold the API "
                           f"key {purpose})")
    return key
