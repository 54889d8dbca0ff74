"""Reading trace datasets as the same `Trace`s whatever their origin: a `distill generate` run
(checksums verified) or Parquet shards in our schema (the teacher's top-k log-probabilities as
arrays when asked), and the public reasoning datasets through their schema presets
(`distill.data.schemas`) from local Parquet / JSONL / JSONL.zst files, save_to_disk folders or the
hub (`distill.data.sources`). Rows are filtered by `keep` and the held-out split.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
import pyarrow.parquet as pq
from pydantic import Discriminator, Field, Tag

from distill.config import DataSource, Frozen
from distill.data.prompts import is_heldout
from distill.data.records import record_id
from distill.data.schemas import (
    TRACE_COLUMNS,
    ReasoningColumns,
    RowError,
    SchemaName,
    Turn,
    check_columns,
    detect_schema,
    preset,
)
from distill.data.sources import SOURCE_FORMATS, RowSource, open_source, source_format
from distill.data.store import read_manifest, shard_paths
from distill.errors import DistillError

# Which trace rows a reader keeps: "correct" (the verdict is true and the trace finished),
# "complete" (finish reason "stop"), "all".
Keep = Literal["correct", "complete", "all"]
KEEP: tuple[str, ...] = get_args(Keep)
_TEACHER_COLUMNS = ("top_ids", "top_logprobs")
_BYTES_COLUMNS = ("token_bytes", "top_bytes")  # read where a shard has them (newer traces)


class TraceSource(Frozen):
    """One trace dataset: `source` is a path (a teacher_traces/<run>, Parquet / JSONL / JSONL.zst
    files or folders of them, a save_to_disk folder) or a hub dataset name with its `config` and
    `split`. `preset` names its schema (`distill.data.schemas`; "auto": told from the columns).
    `keep` (default: "correct" when the rows carry verdicts, else "complete"; a run's manifest
    may say otherwise: an import stores `default_keep`); `drop_system: true`
    leaves the dataset's system prompts out; `limit` reads only the first N rows."""

    # (format comes first: `format: hub` keeps a bare name such as "gsm8k" a hub name)
    format: Literal[SOURCE_FORMATS] = "auto"  # type: ignore[valid-type]
    source: DataSource
    config: str | None = None
    split: str = "train"
    preset: SchemaName = "auto"
    keep: Keep | None = None
    drop_system: bool = False
    columns: ReasoningColumns = ReasoningColumns()  # the `columns` preset's column names
    limit: int | None = Field(None, ge=1)


def _spec_kind(value) -> str:
    return "source-name" if isinstance(value, str) else "source-table"


# A `data.traces` entry: a path or hub name alone, or a TraceSource table.
TraceSpec = Annotated[Annotated[DataSource, Tag("source-name")]
                      | Annotated[TraceSource, Tag("source-table")], Discriminator(_spec_kind)]


def as_source(spec: str | Path | TraceSource) -> TraceSource:
    """A TraceSource from a config entry: a table, or a path / hub name alone."""
    if isinstance(spec, TraceSource):
        return spec
    return TraceSource(source=str(spec))


@dataclasses.dataclass(frozen=True)
class Trace:
    """What training reads of one trace row. top_ids / top_logprobs: per completion token the
    teacher's top-k, as [n, k] arrays (k padded with -inf log-probabilities), or None.
    token_bytes / top_bytes: the bytes of the teacher's sampled tokens [n] and of its top-k
    entries [n][k], where the traces keep them (cross-tokenizer distillation aligns on them)."""

    id: str
    prompt_id: str
    prompt: str | list[dict]
    reasoning: str
    answer: str
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    token_bytes: list[bytes] | None = None
    top_bytes: list[list[bytes]] | None = None


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Kept traces of each dataset, with the datasets' mixture weights and names (their paths)."""

    datasets: tuple[tuple[Trace, ...], ...]
    weights: tuple[float, ...] | None
    names: tuple[str, ...]


def read_traces(sources: Sequence[str | Path | TraceSource], weights: Sequence[float] | None = None,
                keep: str | None = None, with_teacher: bool = False, split: str = "all",
                heldout_fraction: float = 0.0) -> Mixture:
    """Read trace datasets and keep the rows that pass `keep` (a source's own `keep` wins; None:
    the source's default, see TraceSource). with_teacher also reads the top-k columns of our
    store. `split` "train" / "heldout" keeps the prompts outside / inside the held-out fraction
    (by prompt-id hash)."""
    if keep is not None and keep not in KEEP:
        raise DistillError(f"unknown keep filter {keep!r}; choose one of {', '.join(KEEP)}")
    if not sources:
        raise DistillError("no trace dataset given")
    if weights is not None:
        check_weights(weights, len(sources))

    def in_split(prompt_id: str) -> bool:
        if split == "all" or heldout_fraction == 0:
            return split != "heldout"
        return is_heldout(prompt_id, heldout_fraction) == (split == "heldout")

    specs = [as_source(s) for s in sources]
    datasets = tuple(_read_dataset(s, keep, with_teacher, in_split) for s in specs)
    return Mixture(datasets, None if weights is None else tuple(float(w) for w in weights),
                   tuple(s.source for s in specs))


def check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise DistillError(f"{len(weights)} mixture weights for {n} trace datasets")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DistillError(f"mixture weights must be >= 0 with a positive sum (got {list(weights)})")


@dataclasses.dataclass(frozen=True)
class OpenedTraces:
    """A trace source opened for reading: its rows, its preset and the keep filter that applies."""

    rows: RowSource
    preset: str
    keep: str
    spec: TraceSource

    def row_turns(self) -> Iterator[tuple[int, str, list[Turn]]]:
        """(row number, location, the row's traces) of every row of a public-schema source, in
        order, `limit` rows at most. A trace's `index` counts the traces of its prompt so far,
        so ids stay unique when a dataset holds a problem twice."""
        p = preset(self.preset, self.spec.columns)
        seen: Counter[str] = Counter()
        drop = self.spec.drop_system
        for n, (where, row) in enumerate(self.rows.rows()):
            if self.spec.limit is not None and n >= self.spec.limit:
                return
            try:
                turns = p.turns(row, drop, self.spec.columns)
            except RowError as e:
                raise DistillError(f"{where}: {e} (schema {p.name})") from None
            numbered = []
            for turn in turns:
                numbered.append(dataclasses.replace(turn, index=seen[turn.prompt_id]))
                seen[turn.prompt_id] += 1
            yield n, where, numbered

    def turns(self) -> Iterator[tuple[str, Turn]]:
        """(location, trace) of every trace, in row order (see row_turns)."""
        for _, where, turns in self.row_turns():
            for turn in turns:
                yield where, turn

    def traces(self, with_teacher: bool = False, in_split=lambda _: True,
               seen: Counter | None = None) -> Iterator[Trace]:
        """The traces that pass `keep` and `in_split`, streamed in source order (our store's
        with the teacher's top-k when `with_teacher`); `seen["traces"]` counts all read."""
        seen = Counter() if seen is None else seen
        if self.preset == "distill":
            yield from _store_traces(self, with_teacher, in_split, seen)
            return
        for _, turn in self.turns():
            seen["traces"] += 1
            if _keep(turn.correct, turn.finish_reason, self.keep) and in_split(turn.prompt_id):
                yield Trace(record_id(turn.prompt_id, turn.index), turn.prompt_id, turn.messages,
                            turn.reasoning, turn.answer)


def open_traces(spec: TraceSource, keep: str | None = None) -> OpenedTraces:
    """Open a trace source: its rows, the preset (named, or told from the columns; a missing
    column is an error naming it) and the keep filter (the source's, else `keep`, else the
    default: "correct" where rows carry verdicts)."""
    rows = open_source(spec.source, format=spec.format, config=spec.config, split=spec.split)
    name = spec.preset if spec.preset != "auto" else detect_schema(rows.columns, rows.where)
    if name == "distill":
        missing = [c for c in TRACE_COLUMNS if c not in rows.columns]
        if missing:
            raise DistillError(f"{rows.where}: not a trace shard (no column {missing[0]!r})")
        # a run's own default (an import of a dataset without verdicts says "complete")
        default = (read_manifest(spec.source).get("default_keep", "correct")
                   if rows.format == "store" else "correct")
    else:
        p = preset(name, spec.columns)
        check_columns(p, rows.columns, rows.where)
        default = "correct" if p.verdicts in rows.columns else "complete"
    chosen = spec.keep or keep or default
    return OpenedTraces(rows, name, chosen, spec)


def trace_inputs(spec: TraceSource, keep: str | None = None) -> dict:
    """What a tokenized cache of a source depends on, found without reading its rows: the
    source's settings, the keep filter in force, and each input file's size and modification
    time (for a run of ours also the manifest's shard checksums, not recomputed here)."""
    if source_format(spec.source, spec.format) == "store":
        manifest = read_manifest(spec.source)
        files = shard_paths(spec.source, verify=False)
        chosen, name = spec.keep or keep or manifest.get("default_keep", "correct"), "distill"
        checksums = [s["sha256"] for s in manifest["shards"] if s["file"]]
        rows = sum(int(s.get("records", 0)) for s in manifest["shards"]) or None
    else:
        opened = open_traces(spec, keep)
        files, chosen, name, checksums = opened.rows.inputs, opened.keep, opened.preset, []
        rows = opened.rows.num_rows
    root = Path(spec.source)
    stats = []
    for f in files:
        st = f.stat()
        rel = f.relative_to(root) if root in f.parents else f
        stats.append([str(rel), st.st_size, st.st_mtime_ns])
    return {"source": spec.source, "spec": spec.model_dump(mode="json"), "keep": chosen,
            "preset": name, "files": stats, "checksums": checksums, "rows": rows}


def _read_dataset(spec: TraceSource, keep: str | None, with_teacher: bool,
                  in_split=lambda _: True) -> tuple[Trace, ...]:
    opened = open_traces(spec, keep)
    seen = Counter()
    kept = tuple(opened.traces(with_teacher, in_split, seen))
    dataset_errors(opened, seen["traces"], len(kept))
    return kept


def dataset_errors(opened: OpenedTraces, read: int, kept: int) -> None:
    """A dataset that gave no trace to train on is an error saying why."""
    where = opened.rows.where
    if read == 0:
        raise DistillError(f"{where}: the trace dataset is empty (0 traces)")
    if not kept:
        raise DistillError(f"{where}: no trace passes keep={opened.keep!r} (0 of {read} traces)")


def _store_traces(opened: OpenedTraces, with_teacher: bool, in_split, seen: Counter
                  ) -> Iterator[Trace]:
    """Our schema, read shard by shard with pyarrow (the top-k lists as arrays)."""
    files = opened.rows.files
    if not files:
        raise DistillError(f"{opened.rows.where}: the distill schema is read from Parquet shards")
    columns = TRACE_COLUMNS + (_TEACHER_COLUMNS if with_teacher else ())
    limit = opened.spec.limit
    for shard in files:
        try:
            names = set(pq.read_schema(shard).names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise DistillError(f"{shard}: not a trace shard (no column {missing[0]!r})")
            extra = [c for c in _BYTES_COLUMNS if with_teacher and c in names]
            table = pq.read_table(shard, columns=list(columns) + extra)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DistillError(f"{shard}: cannot read parquet: {str(e).splitlines()[0]}") from e
        if limit is not None:
            table = table.slice(0, limit - seen["traces"])
        seen["traces"] += table.num_rows
        for i, row in enumerate(table.select(TRACE_COLUMNS).to_pylist()):
            if _keep(row["correct"], row["finish_reason"], opened.keep) and in_split(
                    row["prompt_id"]):
                yield _trace(row, table, i)
        if limit is not None and seen["traces"] >= limit:
            return


def _keep(correct: bool | None, finish_reason: str | None, keep: str) -> bool:
    if keep == "correct":
        return correct is True and finish_reason in ("stop", None)
    if keep == "complete":
        return finish_reason == "stop"
    return True


def _trace(row: dict, table, i: int) -> Trace:
    prompt = row["messages"] or row["prompt"] or ""
    top_ids = top_lps = None
    if "top_ids" in table.column_names and table.column("top_ids")[i].is_valid:
        top_ids, top_lps = _topk_arrays(table.column("top_ids")[i], table.column("top_logprobs")[i])
    token_bytes = top_bytes = None
    if top_ids is not None and "top_bytes" in table.column_names:
        token_bytes = table.column("token_bytes")[i].as_py()
        top_bytes = table.column("top_bytes")[i].as_py()
    return Trace(id=row["id"], prompt_id=row["prompt_id"], prompt=prompt, reasoning=row["reasoning"] or "",
                 answer=row["answer"] or "", top_ids=top_ids, top_logprobs=top_lps,
                 token_bytes=token_bytes, top_bytes=top_bytes)


def _topk_arrays(ids_scalar, lps_scalar) -> tuple[np.ndarray, np.ndarray]:
    """One row's list<list<...>> top-k cells -> ids int32 [n, k], log-probs float32 [n, k]."""
    ids_list, lps_list = ids_scalar.values, lps_scalar.values
    widths = ids_list.value_lengths().to_numpy(zero_copy_only=False)
    n, k = len(widths), int(widths.max()) if len(widths) else 0
    ids = np.zeros((n, k), np.int32)
    lps = np.full((n, k), -np.inf, np.float32)
    cols = np.arange(k)[None, :] < widths[:, None]
    ids[cols] = ids_list.flatten().to_numpy(zero_copy_only=False)
    lps[cols] = lps_list.flatten().to_numpy(zero_copy_only=False)
    return ids, lps
