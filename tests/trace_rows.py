"""Synthetic arithmetic trace rows (in the trace store's schema) and their Parquet shards, for the
training-data and token-cache tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.data.records import TRACE_SCHEMA
from distill.data.render import render_example
from tests import toy


def trace_row(i: int, steps: int, *, correct=True, reasoning=None, answer=None, **extra) -> dict:
    """A synthetic arithmetic trace row whose length grows with `steps`."""
    rng = np.random.default_rng(i)
    values = rng.integers(1, 99, steps + 1)
    lines = [f"Step {s + 1}: {values[s]} + {values[s + 1]} = {values[s] + values[s + 1]}"
             for s in range(steps)]
    return {"id": f"p{i}#0", "prompt_id": f"p{i}", "sample_index": 0,
            "prompt": f"Add the numbers {' '.join(map(str, values))} in pairs. {toy.CORPUS[2]}",
            "reasoning": "\n".join(lines) if reasoning is None else reasoning,
            "answer": f"The answer is \\boxed{{{int(values.sum())}}}." if answer is None else answer,
            "correct": correct, "finish_reason": "stop", **extra}


def write_traces(directory: Path, rows: list[dict], shards: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = rows[s::shards]
        pq.write_table(pa.Table.from_pylist(part, schema=TRACE_SCHEMA),
                       directory / f"shard-{s:05d}.parquet")
    return directory


def with_teacher(tok, i: int, drop_eos: bool = False, extra: int = 0) -> dict:
    """trace_row(i, 2) with a teacher top-3 on each completion token (`tok`'s rendering)."""
    row = trace_row(i, 2)
    ids, mask = render_example(tok, row["prompt"], row["reasoning"], row["answer"])
    completion = ids[mask].tolist()
    completion = completion[:-1] if drop_eos else completion + [5] * extra
    row["top_ids"] = [[t, (t + 1) % 300, (t + 2) % 300] for t in completion]
    row["top_logprobs"] = [[math.log(0.7), math.log(0.2), math.log(0.1)]] * len(completion)
    return row
