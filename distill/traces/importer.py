"""`distill traces import`: a public trace dataset into our checksummed store, judged like teacher
samples, so that imported and generated traces are the same thing afterwards.

Every trace the source's preset yields (`distill.data.traces.open_traces`) becomes a prompt (its
conversation, with the dataset's reference answer) and a sample (reasoning and answer), and goes
through the generate filters (`distill.traces.filters.Judge`): decontamination (files and named
benchmarks), truncation, the think format, length (with token counts from `tokenizer`, or none),
language mix, the answer re-checked with math-verify against the reference where the dataset has
one (where it has none, the dataset's own verdict decides under keep "correct"), and dedup. Every
rejection is counted by reason in the manifest, with how often our check and the dataset's disagree.

The source is read as a stream, `rows_per_shard` rows per shard; each shard is stored atomically
and listed in the manifest, so an interrupted import resumes at the first missing shard (the
accepted traces of the stored shards are re-registered for dedup), and nothing is complete before
the manifest says so. Rows/s and traces/s are printed as it goes and stored in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

from pydantic import Field, field_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from distill.chat import completion_text
from distill.config import (
    Frozen,
    InputPath,
    OutputPath,
    apply_overrides,
    load_config,
    parse_overrides,
    validate,
)
from distill.data.benchmarks import benchmark, benchmark_prompts
from distill.data.records import PromptRecord, Sample
from distill.data.schemas import Turn
from distill.data.store import iter_records
from distill.data.traces import TraceSource, open_traces
from distill.errors import DistillError
from distill.tokenizer import Tokenizer
from distill.traces.filters import FiltersConfig, Judge
from distill.traces.generate import SamplingConfig, dataset_card, trace_row
from distill.traces.store import TraceStore


class ImportOutput(Frozen):
    root: OutputPath = Field("teacher_traces", validate_default=True)  # runs go to root/<name>
    rows_per_shard: int = Field(4096, ge=1)  # source rows per stored shard


class ImportConfig(Frozen):
    """What `distill traces import` does: which source, which filters, where to."""

    name: str  # the run directory under output.root: one folder name

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str) -> str:
        if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError("must be one folder name (not empty, '.', '..' or a path)")
        return name
    source: TraceSource
    filters: FiltersConfig = FiltersConfig()
    # benchmarks (distill.data.benchmarks names) whose problems no imported prompt may share an
    # n-gram with; read from the hub cache (local copies go in filters.decontaminate)
    decontaminate_benchmarks: tuple[str, ...] = ()
    tokenizer: InputPath | None = None  # counts prompt / completion tokens (length filter)
    output: ImportOutput = Field(default_factory=ImportOutput)


@dataclasses.dataclass
class ImportSummary:
    run_dir: Path
    rows: int
    traces: int
    records: int
    rejected: dict[str, int]
    seconds: float
    rows_per_s: float
    resumed_shards: int


def import_config(source: str, name: str, overrides=(), **fields) -> ImportConfig:
    """The config of `distill traces import SOURCE` (its options as `fields`, then --set)."""
    data = {"name": name, "source": {"source": source, **fields.pop("source_fields", {})},
            **{k: v for k, v in fields.items() if v is not None}}
    return validate(ImportConfig, apply_overrides(data, parse_overrides(overrides)),
                    "distill traces import", check_paths=True)


def load_import_config(path: str | Path, overrides=()) -> ImportConfig:
    return load_config(ImportConfig, path, overrides, check_paths=True)


def _check(cfg: ImportConfig) -> None:
    for name in cfg.decontaminate_benchmarks:
        benchmark(name)  # an unknown name is one line listing the known ones
    if cfg.source.keep is not None:
        raise DistillError("source.keep does not apply to an import: filters.keep decides what "
                           "is stored (correct: re-checked or per the dataset's verdict; "
                           "complete; all)")
    if cfg.filters.max_completion_tokens is not None and cfg.tokenizer is None:
        raise DistillError("filters.max_completion_tokens needs token counts: give a tokenizer "
                           "(--tokenizer PATH, e.g. the teacher's or the student's)")


@dataclasses.dataclass
class _Stats:
    """One shard's counts, stored with it in the manifest (so a resumed import sums them all)."""

    rows: int = 0
    traces: int = 0
    rejected: Counter = dataclasses.field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    disagreed: int = 0  # our re-check and the dataset's verdict differ
    verdicts: int = 0  # kept traces with a verdict (ours or the dataset's)

    def entry(self) -> dict:
        return {"prompts": self.rows, "samples": self.traces, "rejected": dict(self.rejected),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "disagreed": self.disagreed, "verdicts": self.verdicts}


class _Judging:
    """The judge and what it needs per trace: the filters, the benchmark n-grams, the tokenizer."""

    def __init__(self, cfg: ImportConfig):
        self.judge = Judge(cfg.filters)
        for name in cfg.decontaminate_benchmarks:
            self.judge.add_eval_prompts(benchmark_prompts(benchmark(name)))
        self.tokenizer = Tokenizer.from_pretrained(cfg.tokenizer) if cfg.tokenizer else None
        self.keep_correct = cfg.filters.keep == "correct"
        self.sampling = SamplingConfig(n=1)
        self.teacher = f"import:{cfg.source.source}"

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) if self.tokenizer else 0

    def row(self, turn: Turn, stats: _Stats) -> dict | None:
        """The stored row of an accepted trace, else None; counted in `stats`."""
        prompt = PromptRecord(turn.prompt_id, turn.messages, turn.reference)
        text = completion_text(turn.reasoning, turn.answer) if turn.reasoning else turn.answer
        sample = Sample(turn.index, text, turn.finish_reason,
                        self.count("".join(m["content"] for m in turn.messages)),
                        turn.completion_tokens or self.count(text),
                        reasoning=turn.reasoning or None)
        stats.traces += 1
        stats.prompt_tokens += sample.prompt_tokens
        stats.completion_tokens += sample.completion_tokens
        verdict = self.judge.judge(prompt, sample)
        if verdict.correct is not None and turn.correct is not None and (
                verdict.correct != turn.correct):
            stats.disagreed += 1
        reason = verdict.reason
        if reason is None and verdict.correct is None and turn.correct is False and (
                self.keep_correct):
            reason = "wrong"  # no reference to re-check against: the dataset's verdict decides
        if reason is not None:
            stats.rejected[reason] += 1
            return None
        if verdict.correct is None:
            verdict = dataclasses.replace(verdict, correct=turn.correct)
        stats.verdicts += verdict.correct is not None
        row = trace_row(prompt, sample, verdict, self.teacher, self.sampling)
        row["sampling"] = None  # not the import's to say
        return row


def run_import(cfg: ImportConfig, *, overwrite: bool = False, progress: bool = True
               ) -> ImportSummary:
    """Import (or resume importing) the source `cfg` describes."""
    _check(cfg)
    opened = open_traces(cfg.source)  # schema and columns checked before anything is written
    if opened.preset == "distill":
        raise DistillError(f"{opened.rows.where}: already in distill's trace schema; use it in "
                           "data.traces as it is")
    judging = _Judging(cfg)
    run_dir = Path(cfg.output.root) / cfg.name
    identity = json.loads(cfg.model_dump_json(exclude={"output": {"root"}}))
    store = TraceStore.open(run_dir, identity, overwrite=overwrite)
    done = store.done()
    for record in iter_records(run_dir):  # dedup as in an uninterrupted run
        judging.judge.observe(record["prompt_id"], record["completion"], record["reasoning"])
    per = cfg.output.rows_per_shard
    t0 = time.perf_counter()
    rows_read = judged = 0
    earlier = store.totals()["samples"]  # traces of the shards stored before this shard
    shard, rows, stats = 0, [], _Stats()
    with _ImportProgress(opened.rows.num_rows, progress) as bar:
        for row_index, _, turns in opened.row_turns():
            if row_index // per != shard:
                _flush(store, shard, rows, stats, done)
                earlier += stats.traces
                shard, rows, stats = row_index // per, [], _Stats()
            rows_read += 1
            stats.rows += 1
            if shard not in done:  # a stored shard's rows are only read past
                judged += 1
                rows += [r for r in (judging.row(t, stats) for t in turns) if r is not None]
            bar.advance(rows_read, earlier + stats.traces, time.perf_counter() - t0)
        _flush(store, shard, rows, stats, done)
    if rows_read == 0:
        raise DistillError(f"{opened.rows.where}: the dataset is empty (0 rows)")
    seconds = time.perf_counter() - t0
    rate = judged / max(seconds, 1e-9)
    shards = store.manifest["shards"]
    store.set_info(teacher={"kind": "import", "model": cfg.source.source,
                            "preset": opened.preset},
                   source_rows=rows_read,
                   disagreed_with_dataset=sum(s.get("disagreed", 0) for s in shards),
                   default_keep=_default_keep(cfg, sum(s.get("verdicts", 0) for s in shards)),
                   rows_per_s=round(rate, 1))
    totals = store.finish(dataset_card(cfg.name, run_dir, store.manifest))
    return ImportSummary(run_dir, rows_read, totals["samples"], totals["records"],
                         totals["rejected"], seconds, rate, len(done))


def _default_keep(cfg: ImportConfig, verdicts: int) -> str:
    """What training keeps of this store by default: everything stored passed the filters, so
    "complete", unless wrong traces were stored too (filters.keep: complete or all) with verdicts
    to tell them apart."""
    return "correct" if cfg.filters.keep != "correct" and verdicts else "complete"


def _flush(store: TraceStore, shard: int, rows: list[dict], stats: _Stats, done: set) -> None:
    if shard in done or stats.rows == 0:
        return
    store.add_shard(shard, rows, stats.entry())


class _ImportProgress:
    """Rows read (of all, when known), traces, rows/s."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = Progress(TextColumn("[bold]import"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("rows · {task.fields[traces]} traces · "
                                       "{task.fields[rate]:.0f} rows/s"), TimeElapsedColumn(),
                            console=Console(stderr=True), disable=not enabled)
        self.task = self.bar.add_task("import", total=total, traces=0, rate=0.0)

    def __enter__(self) -> _ImportProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, rows: int, traces: int, seconds: float) -> None:
        if rows % 256 == 0:
            self.bar.update(self.task, completed=rows, traces=traces,
                            rate=rows / max(seconds, 1e-9))
