"""Reading trace datasets: a `distill generate` run (checksums verified) or a folder / file of
Parquet shards in the trace schema, filtered by `keep` and the held-out split, with the teacher's
top-k log-probabilities as arrays when asked."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow.parquet as pq

from distill.data.prompts import is_heldout
from distill.data.store import shard_paths
from distill.errors import DistillError

Keep = Literal["correct", "complete", "all"]  # which trace rows a reader keeps
KEEP: tuple[str, ...] = get_args(Keep)
_TRACE_COLUMNS = ("id", "prompt_id", "prompt", "messages", "reasoning", "answer", "correct",
                  "finish_reason")
_TEACHER_COLUMNS = ("top_ids", "top_logprobs")


@dataclasses.dataclass(frozen=True)
class Trace:
    """What training reads of one trace row. top_ids / top_logprobs: per completion token the
    teacher's top-k, as [n, k] arrays (k padded with -inf log-probabilities), or None."""

    id: str
    prompt_id: str
    prompt: str | list[dict]
    reasoning: str
    answer: str
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Kept traces of each dataset, with the datasets' mixture weights and names (their paths)."""

    datasets: tuple[tuple[Trace, ...], ...]
    weights: tuple[float, ...] | None
    names: tuple[str, ...]


def read_traces(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
                keep: str = "correct", with_teacher: bool = False, split: str = "all",
                heldout_fraction: float = 0.0) -> Mixture:
    """Read trace datasets (a teacher_traces/<run> directory of *.parquet shards, or one .parquet
    file each) and keep the rows that pass `keep`: "correct" (correct is true), "complete"
    (finish_reason "stop") or "all". with_teacher also reads the top-k columns. `split` "train" /
    "heldout" keeps the prompts outside / inside the held-out fraction (by prompt-id hash)."""
    if keep not in KEEP:
        raise DistillError(f"unknown keep filter {keep!r}; choose one of {', '.join(KEEP)}")
    if not paths:
        raise DistillError("no trace dataset given")
    if weights is not None:
        _check_weights(weights, len(paths))

    def in_split(prompt_id: str) -> bool:
        if split == "all" or heldout_fraction == 0:
            return split != "heldout"
        return is_heldout(prompt_id, heldout_fraction) == (split == "heldout")

    datasets = tuple(_read_dataset(Path(p), keep, with_teacher, in_split) for p in paths)
    return Mixture(datasets, None if weights is None else tuple(float(w) for w in weights),
                   tuple(str(p) for p in paths))


def _check_weights(weights: Sequence[float], n: int) -> None:
    if len(weights) != n:
        raise DistillError(f"{len(weights)} mixture weights for {n} trace datasets")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DistillError(f"mixture weights must be >= 0 with a positive sum (got {list(weights)})")


def _shards(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".parquet":
        return [path]
    if (path / "manifest.json").is_file():  # a `distill generate` run: checksums verified

        files = shard_paths(path)
        if files:
            return files
        raise DistillError(f"{path}: the trace run holds no records (an empty trace dataset)")
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if files:
            return files
        raise DistillError(f"{path}: no .parquet shards (an empty trace dataset)")
    raise DistillError(f"{path}: no such trace dataset (want a directory of .parquet shards)")


def _read_dataset(path: Path, keep: str, with_teacher: bool, in_split=lambda _: True
                  ) -> tuple[Trace, ...]:
    columns = _TRACE_COLUMNS + (_TEACHER_COLUMNS if with_teacher else ())
    kept, rows = [], 0
    for shard in _shards(path):
        try:
            names = set(pq.read_schema(shard).names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise DistillError(f"{shard}: not a trace shard (no column {missing[0]!r})")
            table = pq.read_table(shard, columns=list(columns))
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DistillError(f"{shard}: cannot read parquet: {str(e).splitlines()[0]}") from e
        rows += table.num_rows
        kept += [_trace(row, table, i) for i, row in enumerate(table.select(_TRACE_COLUMNS)
                                                               .to_pylist())
                 if _keep(row, keep) and in_split(row["prompt_id"])]
    if rows == 0:
        raise DistillError(f"{path}: the trace dataset is empty (0 rows)")
    if not kept:
        raise DistillError(f"{path}: no trace passes keep={keep!r} (0 of {rows} rows)")
    return tuple(kept)


def _keep(row: dict, keep: str) -> bool:
    if keep == "correct":
        return row["correct"] is True
    if keep == "complete":
        return row["finish_reason"] == "stop"
    return True


def _trace(row: dict, table, i: int) -> Trace:
    prompt = row["messages"] or row["prompt"] or ""
    top_ids = top_lps = None
    if "top_ids" in table.column_names and table.column("top_ids")[i].is_valid:
        top_ids, top_lps = _topk_arrays(table.column("top_ids")[i], table.column("top_logprobs")[i])
    return Trace(id=row["id"], prompt_id=row["prompt_id"], prompt=prompt, reasoning=row["reasoning"] or "",
                 answer=row["answer"] or "", top_ids=top_ids, top_logprobs=top_lps)


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
