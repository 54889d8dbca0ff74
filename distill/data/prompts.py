"""Prompt sources for `distill generate`: files, saved or hub datasets, and built-in synthetic tasks.

Sources (`PromptsConfig.format`, or "auto" to tell from `source`):

- "jsonl": one JSON object per line (blank lines are ignored); errors name `file:LINE`.
- "parquet", "csv" (UTF-8, header row; text cells only), "hf_disk" (a folder
  written by `datasets.Dataset.save_to_disk`, or a DatasetDict's, read at `hub_split`), "hub" (a
  Hugging Face hub dataset name, loaded with `datasets.load_dataset(name, split=hub_split)`), and
  "synthetic" (the arithmetic chain family of `distill.data.synthetic`).

"auto" picks "synthetic" for the source "synthetic", a format from the suffix (.jsonl, .parquet,
.csv), "hf_disk" for a folder holding dataset_info.json or state.json, and "hub" for a name that is
not a local path. Errors in columnar sources name `file: row N` (0-based, as in `dataset[N]`).

A prompt is a text or a list of chat messages [{"role", "content"}, ...]. `template` is applied to
text prompts only: "{prompt}" in it is replaced by the text (other braces are kept, so
"{prompt}\\n\\n" + BOXED_INSTRUCTION works). A prompt without an id column gets the id
"p-" + sha256(prompt)[:16] of the prompt before templating, so ids (and therefore the held-out
split) do not move when the template changes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field, ValidationInfo, field_validator, model_validator

from distill.config import Frozen, check_input, resolve_path, resolve_source
from distill.data.records import PromptRecord
from distill.data.sources import HF_DISK_MARKERS, first_line, load_disk, load_hub
from distill.data.synthetic import arithmetic_problems
from distill.errors import DistillError

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}
_MAX_LOGGED_BAD_ROWS = 10  # each skipped row is logged up to this many, then only the count


class ColumnMap(Frozen):
    """Which columns hold the prompt, the reference answer and the id.

    A configured column that the source lacks is an error, except `reference: null` (no
    reference answers) and `id: null` (ids are hashes of the prompt).
    """

    prompt: str = "prompt"
    reference: str | None = "answer"
    id: str | None = None


class SyntheticConfig(Frozen):
    """The built-in arithmetic chain problems (see `distill.data.synthetic`)."""

    n: int = Field(100, ge=1)
    seed: int = 0
    min_steps: int = Field(2, ge=1)
    max_steps: int = Field(4, ge=1)
    style: Literal["words", "compact"] = "words"

    @model_validator(mode="after")
    def _steps_order(self) -> SyntheticConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) is above max_steps ({self.max_steps})")
        return self


class PromptsConfig(Frozen):
    """Where prompts come from and which of them to use (see the module doc for formats).

    `source` is "synthetic", a hub dataset name, or a file or folder path, which is resolved by
    distill's one path rule (`distill.config.resolve_path`: relative to the working directory).
    With `format: auto` a source is a path when something exists there or it looks like one
    (`distill.config.resolve_source`: no "/", a leading ".", "/", "~", teacher_traces/ or
    students/, or a data file suffix), else a hub dataset name (`owner/name`); `format: hub`
    makes any name a hub name.
    """

    # (format comes first: the source's validator reads it)
    format: Literal["auto", "jsonl", "parquet", "csv", "hf_disk", "hub", "synthetic"] = "auto"
    source: str  # "synthetic", a file or folder path, or a hub dataset name
    columns: ColumnMap = ColumnMap()
    hub_split: str = "train"  # the split of a hub dataset or of a saved DatasetDict
    template: str | None = None  # applied to text prompts; "{prompt}" marks the text
    split: Literal["all", "train", "heldout"] = "all"
    heldout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    limit: int | None = Field(None, ge=1)  # the first N prompts, after the split
    on_bad_row: Literal["fail", "skip"] = "fail"
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("source")
    @classmethod
    def _source_path(cls, source: str, info: ValidationInfo) -> str:
        fmt = info.data.get("format", "auto")
        if fmt in ("hub", "synthetic") or (fmt == "auto" and source == "synthetic"):
            return source
        if fmt == "auto":
            return resolve_source(source, info)
        return check_input(resolve_path(source), info)

    @field_validator("template")
    @classmethod
    def _template_has_prompt(cls, template: str | None) -> str | None:
        if template is not None and "{prompt}" not in template:
            raise ValueError("the template must contain {prompt}")
        return template


def load_prompts(cfg: PromptsConfig) -> list[PromptRecord]:
    """The prompts `cfg` selects, in source order. Bad input raises DistillError with one line
    naming the place."""
    fmt, where = _resolve(cfg)
    if fmt == "synthetic":
        records, bad = _synthetic(cfg), _BadRows(cfg.on_bad_row, where)
    else:
        bad = _BadRows(cfg.on_bad_row, str(where))
        records = _collect(_rows(fmt, where, cfg), cfg, bad)
    bad.report(len(records))
    kept = [r for r in records if _in_split(r.id, cfg)]
    if cfg.limit is not None:
        kept = kept[:cfg.limit]
    if not kept:
        raise DistillError(_why_empty(cfg, where, len(records), bad.count))
    return kept


def is_heldout(prompt_id: str, fraction: float) -> bool:
    """Whether a prompt is held out: sha256(id) read as a uniform number in [0, 1) < fraction.
    Stable, and independent of order and of the other prompts."""
    if not 0.0 <= fraction < 1.0:
        raise DistillError(f"heldout_fraction must be in [0, 1) (got {fraction})")
    return heldout_rank(prompt_id) < fraction


def heldout_rank(prompt_id: str) -> float:
    """sha256(prompt id) read as a uniform number in [0, 1): a prompt is held out below the
    fraction (what a tokenized cache stores per document, so any fraction splits it later)."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") / 2.0**64


def prompt_hash_id(prompt: str | list[dict[str, str]]) -> str:
    """The id of a prompt without an id column: "p-" + the first 16 hex of sha256(prompt)."""
    text = prompt if isinstance(prompt, str) else json.dumps(
        prompt, sort_keys=True, ensure_ascii=False)
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def apply_template(template: str | None, prompt: str | list[dict[str, str]]):
    """A text prompt put into `template` ("{prompt}" replaced); chat prompts are left as they are."""
    if template is None or not isinstance(prompt, str):
        return prompt
    return template.replace("{prompt}", prompt)


# ---------------------------------------------------------------------------------------------
# Source resolution


def _resolve(cfg: PromptsConfig) -> tuple[str, Any]:
    """(format, location): a Path for local sources (absolute: the config resolved it), the name
    for hub/synthetic sources."""
    if cfg.format == "synthetic" or (cfg.format == "auto" and cfg.source == "synthetic"):
        return "synthetic", "synthetic"
    if cfg.format == "hub":
        return "hub", cfg.source
    if not os.path.isabs(cfg.source):  # kept as a name by the config: a hub dataset
        return "hub", cfg.source
    path = Path(cfg.source)
    if cfg.format != "auto":
        if not path.exists():
            raise DistillError(f"prompt source not found: {path}")
        return cfg.format, path
    if path.is_dir():
        if not any((path / m).is_file() for m in HF_DISK_MARKERS):
            raise DistillError(f"{path}: folder is not a dataset saved with save_to_disk "
                               f"(no {' or '.join(HF_DISK_MARKERS)}); set prompts.format")
        return "hf_disk", path
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if path.is_file():
        if fmt is None:
            raise DistillError(f"{path}: cannot tell the format from the suffix {path.suffix!r} "
                               f"(known: {', '.join(_SUFFIX_FORMATS)}); set prompts.format")
        return fmt, path
    raise DistillError(f"prompt source not found: {path}")


def _rows(fmt: str, where: Any, cfg: PromptsConfig) -> Iterator[tuple[str, Any]]:
    """(location, row dict or a _Bad) per row of the source, after its column check."""
    cols = _needed_columns(cfg.columns)
    if fmt == "jsonl":
        return _jsonl_rows(where, cols)
    if fmt == "parquet":
        return _parquet_rows(where, cols)
    if fmt == "csv":
        return _csv_rows(where, cols)
    if fmt == "hf_disk":
        return _dataset_rows(load_disk(where, cfg.hub_split), str(where), cols)
    try:
        ds = load_hub(where, None, cfg.hub_split)
    except DistillError as e:
        if cfg.format == "auto":  # the name was only guessed to be a hub dataset
            raise DistillError(f"{e} (no local file or folder of that name either)") from None
        raise
    return _dataset_rows(ds, f"hub dataset {where!r}", cols)


def _needed_columns(columns: ColumnMap) -> list[str]:
    return [c for c in (columns.prompt, columns.reference, columns.id) if c is not None]


def _require_columns(available: list[str], needed: list[str], where: str) -> None:
    for col in needed:
        if col not in available:
            raise DistillError(f"{where}: missing column {col!r} (available: "
                               f"{', '.join(map(repr, available)) or 'none'})")


# ---------------------------------------------------------------------------------------------
# Readers: each yields (location, row) where row is a dict, or a _Bad saying why it is unusable.


class _Bad(str):
    """A row that could not be read; the text says why."""


def _jsonl_rows(path: Path, cols: list[str]) -> Iterator[tuple[str, Any]]:
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            rows.append((f"{path}:{lineno}", _parse_json_line(raw)))
    parsed = [r for _, r in rows if r is not None]
    if not parsed:
        raise DistillError(f"{path}: empty file, no prompts")
    # A column that no row has is a file-level error; a row lacking it is a bad row.
    keys = sorted({k for r in parsed if isinstance(r, dict) for k in r})
    if any(isinstance(r, dict) for r in parsed):
        _require_columns(keys, cols, str(path))
    return ((where, row) for where, row in rows if row is not None)


def _parse_json_line(raw: bytes) -> Any:
    """A JSON object, None for a blank line, or a _Bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Bad(f"not UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return _Bad(f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(row, dict):
        return _Bad(f"expected a JSON object, got {type(row).__name__}")
    return row


def _parquet_rows(path: Path, cols: list[str]) -> Iterator[tuple[str, Any]]:
    try:
        schema = pq.read_schema(path)
        _require_columns(schema.names, cols, str(path))
        table = pq.read_table(path, columns=cols)
    except DistillError:
        raise
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DistillError(f"{path}: cannot read as parquet ({first_line(e)})") from None
    if table.num_rows == 0:
        raise DistillError(f"{path}: empty file, no prompts")
    return ((f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist()))


def _csv_rows(path: Path, cols: list[str]) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames
            if not fields:
                raise DistillError(f"{path}: empty file, no prompts")
            _require_columns(list(fields), cols, str(path))
            rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    except UnicodeDecodeError as e:
        raise DistillError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DistillError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise DistillError(f"{path}: no rows after the header, no prompts")
    return iter(rows)


def _dataset_rows(ds, where: str, cols: list[str]) -> Iterator[tuple[str, Any]]:
    _require_columns(list(ds.column_names), cols, where)
    if len(ds) == 0:
        raise DistillError(f"{where}: empty dataset, no prompts")
    return ((f"{where}: row {i}", row) for i, row in enumerate(ds.select_columns(cols)))


# ---------------------------------------------------------------------------------------------
# Rows -> records


class _BadRows:
    """Applies `on_bad_row`: fail raises at the first bad row, skip logs and counts."""

    def __init__(self, mode: str, source: str):
        self.mode, self.source, self.count = mode, source, 0

    def __call__(self, where: str, why: str) -> None:
        if self.mode == "fail":
            raise DistillError(f"{where}: {why} (set prompts.on_bad_row: skip to skip bad rows)")
        self.count += 1
        if self.count <= _MAX_LOGGED_BAD_ROWS:
            log.warning("skipping bad row %s: %s", where, why)

    def report(self, kept: int) -> None:
        if self.count:
            log.warning("skipped %d bad row(s) in %s; %d prompt(s) read", self.count,
                        self.source, kept)


def _collect(rows: Iterator[tuple[str, Any]], cfg: PromptsConfig,
             bad: Callable[[str, str], None]) -> list[PromptRecord]:
    records, first_seen = [], {}
    for where, row in rows:
        try:
            record = _record(row, cfg)
        except _RowError as e:
            bad(where, str(e))
            continue
        if record.id in first_seen:
            bad(where, f"duplicate prompt id {record.id!r} (first at {first_seen[record.id]})")
            continue
        first_seen[record.id] = where
        records.append(record)
    return records


class _RowError(Exception):
    """Why one row cannot become a prompt."""


def _record(row: Any, cfg: PromptsConfig) -> PromptRecord:
    if isinstance(row, _Bad):
        raise _RowError(str(row))
    cols = cfg.columns
    prompt = _prompt(row.get(cols.prompt), cols.prompt)
    reference = _reference(row.get(cols.reference)) if cols.reference is not None else None
    return PromptRecord(id=_id(row, cols.id, prompt), prompt=apply_template(cfg.template, prompt),
                        reference=reference, meta={"source": cfg.source})


def _reference(value: Any) -> str | None:
    """The reference answer as text; None for a missing or blank value (CSV has no null)."""
    if value is None or str(value).strip() == "":
        return None
    # An integer column with nulls often arrives as floats (pandas): 2.0 is the answer "2".
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _prompt(value: Any, col: str) -> str | list[dict[str, str]]:
    """A non-empty text, or a non-empty list of {role, content} messages with text values."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(f"empty prompt in column {col!r}")
        return value
    if isinstance(value, list) and value:
        messages = []
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise _RowError(f"message {i} in column {col!r} is not {{role, content}} text")
            messages.append({"role": m["role"], "content": m["content"]})
        return messages
    if value is None:
        raise _RowError(f"no prompt in column {col!r}")
    raise _RowError(f"prompt in column {col!r} is neither text nor chat messages "
                    f"(got {type(value).__name__})")


def _id(row: dict, col: str | None, prompt: str | list[dict[str, str]]) -> str:
    if col is None:
        return prompt_hash_id(prompt)
    value = row.get(col)
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise _RowError(f"no usable id in column {col!r} (got {value!r})")
    return str(value)


def _synthetic(cfg: PromptsConfig) -> list[PromptRecord]:
    s = cfg.synthetic
    problems = arithmetic_problems(s.n, seed=s.seed, min_steps=s.min_steps,
                                   max_steps=s.max_steps, style=s.style)
    return [PromptRecord(id=p.id, prompt=apply_template(cfg.template, p.question),
                         reference=p.answer,
                         meta={"difficulty": p.difficulty, "source": "synthetic"})
            for p in problems]


# ---------------------------------------------------------------------------------------------
# Splits


def _in_split(prompt_id: str, cfg: PromptsConfig) -> bool:
    if cfg.split == "all":
        return True
    return is_heldout(prompt_id, cfg.heldout_fraction) == (cfg.split == "heldout")


def _why_empty(cfg: PromptsConfig, where: Any, n_read: int, n_bad: int) -> str:
    if n_read == 0:
        return f"{where}: no prompts left: all {n_bad} row(s) were bad and skipped"
    return (f"{where}: no prompts left after split={cfg.split!r} with heldout_fraction="
            f"{cfg.heldout_fraction} ({n_read} prompt(s) read)")
