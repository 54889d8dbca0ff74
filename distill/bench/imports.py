"""The import benchmark: `distill traces import` of a synthetic OpenR1-Math-220k-shaped Parquet
file (the real schema, four R1-like generations per problem: right, truncated, wrong, and right
with a null finish reason but complete), measured in a fresh process: rows/s, traces/s and peak resident memory, set
beside the file's size and beside `datasets` reading the same file (the floor for touching every
row: `load_dataset("parquet")` then one pass over the rows).

    python -m distill.bench.imports --rows 200000 --out students/bench/import
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# the OpenR1-Math-220k features (dataset card, config "default")
_S = pa.string()
SCHEMA = pa.schema(
    [(c, _S) for c in ("problem", "solution", "answer", "problem_type", "question_type", "source",
                       "uuid")]
    + [("is_reasoning_complete", pa.list_(pa.bool_())), ("generations", pa.list_(_S)),
       ("correctness_math_verify", pa.list_(pa.bool_())),
       ("correctness_llama", pa.list_(pa.bool_())), ("finish_reasons", pa.list_(_S)),
       ("correctness_count", pa.int64()),
       ("messages", pa.list_(pa.struct([("content", _S), ("role", _S)])))])
_STEP = "Try {x}, expand {y} terms, compare {z} against {w}, keep {v}. "


def _row(i: int, steps: int) -> dict:
    a, b = i % 997 + 2, i % 89 + 3
    problem = f"Problem {i}: find the value of {a} * {b} + {i % 13}."
    right = a * b + i % 13
    def gen(answer: int, closed: bool = True, word: str = "Thus") -> str:
        rng = random.Random(f"{i}:{answer}:{closed}:{word}")  # generations differ, like R1's
        body = "".join(_STEP.format(**{k: rng.randrange(1000) for k in "xyzwv"})
                       for _ in range(steps))
        tail = f"\n</think>\n\nSo the value is $\\boxed{{{answer}}}$." if closed else ""
        return f"<think>\n{word}, {body}so {a} * {b} + {i % 13} = {answer}.{tail}"

    gens = [gen(right), gen(right, closed=False), gen(right + 1), gen(right, word="Again")]
    return {"problem": problem, "solution": f"{a}*{b}+{i % 13}={right}", "answer": str(right),
            "problem_type": "Algebra", "question_type": "math-word-problem",
            "source": "olympiads", "uuid": f"{i:08x}-synthetic",
            "is_reasoning_complete": [True, False, True, True], "generations": gens,
            "correctness_math_verify": [True, True, False, True], "correctness_llama": None,
            "finish_reasons": ["stop", "length", "stop", None], "correctness_count": 3,
            "messages": [{"content": problem, "role": "user"},
                         {"content": gens[0], "role": "assistant"}]}


def write_synthetic(path: Path, rows: int, steps: int = 12, chunk: int = 5000) -> Path:
    """`rows` OpenR1-Math-shaped rows, written a chunk at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, SCHEMA, compression="zstd") as w:
        for start in range(0, rows, chunk):
            batch = [_row(i, steps) for i in range(start, min(rows, start + chunk))]
            w.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
    return path


_PEAK = """
import resource
print(json.dumps({**result, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 1024}))
"""


def in_fresh_process(code: str, env: dict | None = None) -> dict:
    """Run `code` (which sets `result`) in a fresh interpreter (with `env` added to the
    environment); `result` plus that process's peak RSS in MiB (Linux reports KiB)."""
    out = subprocess.run([sys.executable, "-c", code + _PEAK], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"the measured process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_import(rows: int, out: Path, steps: int = 12) -> dict:
    """Write the synthetic file, then import it and read it with `datasets`, each in a fresh
    process."""
    data = write_synthetic(out / "openr1-synthetic.parquet", rows, steps)
    run_root = out / "runs"
    imported = in_fresh_process(f"""
import json, time
from distill.traces.importer import import_config, run_import
cfg = import_config({str(data)!r}, "openr1-synthetic", output={{"root": {str(run_root)!r}}})
t0 = time.perf_counter()
s = run_import(cfg, overwrite=True, progress=False)
result = {{"rows": s.rows, "traces": s.traces, "kept": s.records, "rejected": s.rejected,
          "seconds": time.perf_counter() - t0}}
""")
    reference = in_fresh_process(f"""
import json, time
t0 = time.perf_counter()
import datasets
ds = datasets.load_dataset("parquet", data_files={str(data)!r}, split="train",
                           cache_dir={str(out / "hf-cache")!r})
n = sum(len(r["generations"]) for r in ds)
result = {{"rows": len(ds), "traces": n, "seconds": time.perf_counter() - t0}}
""")
    for r in (imported, reference):
        r["rows_per_s"] = round(r["rows"] / r["seconds"], 1)
    return {"rows": rows, "file_mib": round(data.stat().st_size / 2**20, 1),
            "text_mib": round(pq.read_metadata(data).row_group(0).total_byte_size
                              * pq.read_metadata(data).num_row_groups / 2**20, 1),
            "import": imported, "datasets_read": reference,
            "import_vs_datasets_rows_per_s": round(imported["rows_per_s"]
                                                   / reference["rows_per_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=12, help="reasoning sentences per generation")
    parser.add_argument("--out", type=Path, default=Path("students/bench/import"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = bench_import(args.rows, args.out, args.steps)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "import.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
