"""`distill eval`: students and the teacher side by side on the same held-out prompts.

Every model (in process or over HTTP) samples `protocol.n` completions per prompt (and one greedy
completion), each is checked against the reference answer, and the report gives per model: pass@1
with a 95% interval, cons@n, greedy accuracy, format compliance (a closed think block), response
lengths, generated tokens/s, accuracy by difficulty, and, for students sharing the teacher's
tokenizer, per-token KL and top-1 agreement on the teacher's traces (see
`distill.eval.metrics` and `distill.eval.agreement` for the definitions).

Resumable, sample by sample: each completion is appended to `<output>.partial/samples.jsonl` as
it ends, keyed by (model, prompt id, sample index, greedy) (`distill.eval.samples`). After a
`kill -9`, a preemption or a full disk, rerunning the same command samples only what is missing
and computes the report from the stored samples, so it equals an uninterrupted run's; a rerun
whose protocol, prompts or models differ is refused in one line. The folder is removed once the
report is in place.

Reproducible: every sample has its own seed, from (protocol.seed, prompt id, sample index), in
process and over HTTP alike (`distill.sampling.sample_seed`), so a sample draws the same tokens
whatever else is in flight, and the same config and seed give the same report; wall-clock numbers
live apart, under "timing" (this run's sampling: seconds, samples drawn and resumed, generated
tokens/s, JIT compilation included for a model in process).

Outputs (in `output`, default students/eval/<name>/), written into a temporary folder and moved
into place at the end, so a report directory is never half-written:
eval.json, eval.md, samples.jsonl (one line per model, prompt and sample, in that order) and
plots/*.png.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from distill import runs
from distill.backends import make_sampler
from distill.backends.forcing import budget_forced
from distill.chat import generated_text, split_think
from distill.config import apply_overrides, load_config, parse_overrides, resolve_path, validate
from distill.data.benchmarks import Benchmark, benchmark, load_benchmark
from distill.data.prompts import load_prompts
from distill.data.records import PromptRecord, Sample, Thinking
from distill.errors import DistillError
from distill.eval.agreement import (
    agreement,
    load_kl_traces,
    teacher_tokenizer,
)
from distill.eval.config import EvalConfig, model_name
from distill.eval.report import build_report, write_outputs
from distill.eval.samples import SampleStore, fingerprint, work_dir
from distill.extractive_match import judge_math
from distill.pretrained import model_kind
from distill.verify import answers_match, extract_answer

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "load_eval_config", "run_eval"]


@dataclasses.dataclass
class Outcome:
    """One completion, checked."""

    sample_index: int
    completion: str
    predicted: str | None
    correct: bool
    think_closed: bool
    tokens: int
    finish_reason: str
    thinking: Thinking | None = None  # budget forcing's record of the sample


@dataclasses.dataclass
class ModelRun:
    """Everything one model produced: samples [P][n], greedy [P] (or None), sampling wall time,
    teacher agreement (or None), notes on what was skipped, and the samples and tokens this
    run drew (the rest were stored by an earlier run)."""

    entry: object
    name: str
    samples: list[list[Outcome]]
    greedy: list[Outcome] | None
    seconds: float
    agreement: dict | None
    notes: list[str]
    sampled: int = 0
    sampled_tokens: int = 0


def load_eval_config(path: str | Path, overrides=(), *, check_paths: bool = False) -> EvalConfig:
    """The validated config; errors name the file and the dotted key (models.N.key).
    `check_paths`: every input path (models, prompts, traces, metrics) must exist."""
    return load_config(EvalConfig, path, overrides, check_paths=check_paths)


def run_eval(config_path: str | Path | None, overrides=(), *, progress: bool = True,
             data: dict | None = None) -> dict:
    """Evaluate the models a config lists and write the report; returns the eval.json content.
    `data`: the config as a mapping instead of a file (`distill eval --benchmark`). Samples a
    previous run of the same config left in `<output>.partial/` are used, not drawn again."""
    if data is not None:
        cfg = validate(EvalConfig, apply_overrides(data, parse_overrides(overrides)),
                       "distill eval --benchmark", check_paths=True)
        config_path = Path(cfg.name)
    else:
        config_path = Path(config_path)
        cfg = load_eval_config(config_path, overrides, check_paths=True)
    name = cfg.name or config_path.stem
    out_dir = Path(cfg.output or resolve_path(Path("students") / "eval" / name))
    bench = benchmark(cfg.benchmark.name) if cfg.benchmark else None
    prompts = (load_benchmark(bench, cfg.benchmark.source, cfg.protocol.seed, cfg.benchmark.limit,
                              cfg.protocol.answer_reading)
               if bench else load_prompts(cfg.prompts))
    _check_references(prompts, config_path)
    _check_models(cfg)
    kl = _prepare_kl(cfg, prompts)
    curves = _loss_curves(cfg)
    store = SampleStore.open(work_dir(out_dir), sample_fingerprint(cfg, prompts))
    runs = []
    try:
        with _Progress(progress) as bar:
            for entry in cfg.models:
                runs.append(evaluate_model(entry, prompts, cfg, kl, bar, bench, store))
                gc.collect()  # free one model's buffers before the next one loads
    finally:
        store.close()
    report = build_report(name, out_dir, cfg, prompts, runs)
    write_outputs(out_dir, report, runs, prompts, curves,
                  kept=f"the {len(store.rows)} samples are kept in {store.path}")
    store.remove()  # the report holds them now
    return report


def sample_fingerprint(cfg: EvalConfig, prompts: list[PromptRecord]) -> dict:
    """What decides an eval's samples (`distill.eval.samples.fingerprint`): not the answer reading,
    which reads the stored samples anew on every run (its GPQA layout is in the prompts' digest)."""
    models = {model_name(m): m.model_dump(mode="json", exclude={"name"}) for m in cfg.models}
    protocol = cfg.protocol.model_dump(mode="json", exclude={"answer_reading"})
    return fingerprint(protocol, prompts, models)


# ---------------------------------------------------------------------------------------------
# Checks before anything is sampled


def _check_references(prompts: list[PromptRecord], config_path: Path) -> None:
    missing = next((p.id for p in prompts if p.reference is None), None)
    if missing is not None:
        raise DistillError(f"{config_path}: prompt {missing!r} has no reference answer; every "
                           "evaluated prompt needs one (see prompts.columns.reference)")


def _check_models(cfg: EvalConfig) -> None:
    """A model path that is not a model fails here, in one line, before any model is sampled."""
    for entry in cfg.models:
        if entry.kind == "jax":
            model_kind(entry.model)


@dataclasses.dataclass
class _KL:
    traces: list
    with_topk: bool  # the traces carry teacher top-k (KL), else text only (NLL)
    fingerprint: str | None  # the teacher tokenizer's; None when unknown or not needed
    note: str | None


def _prepare_kl(cfg: EvalConfig, prompts: list[PromptRecord]) -> _KL | None:
    if cfg.kl is None:
        return None

    traces, with_topk = load_kl_traces(cfg.kl, {p.id for p in prompts})
    if not with_topk:  # scored with each student's own tokenizer
        return _KL(traces, False, None, None)
    teacher = next((m for m in cfg.models if m.role == "teacher"), None)
    tokenizer, note = teacher_tokenizer(cfg.kl, teacher)
    if tokenizer is None and note is None:
        note = "the teacher model carries no tokenizer (set kl.tokenizer)"
    return _KL(traces, True, tokenizer.vocabulary_fingerprint() if tokenizer else None, note)


# ---------------------------------------------------------------------------------------------
# One model


def evaluate_model(entry, prompts: list[PromptRecord], cfg: EvalConfig, kl: _KL | None,
                   bar: _Progress | None, bench: Benchmark | None,
                   store: SampleStore) -> ModelRun:
    """Sample what `store` lacks of one model (each sample stored as it ends), then check every
    stored sample and (when it applies) score the model."""
    name = model_name(entry)
    p = cfg.protocol
    passes = {False: p.params(), **({True: p.params().greedy()} if p.greedy else {})}
    todo = {greedy: [[i for i in range(params.n) if (name, q.id, i, greedy) not in store]
                     for q in prompts] for greedy, params in passes.items()}
    total = len(prompts) * (p.n + p.greedy)
    left = sum(len(x) for rows in todo.values() for x in rows)
    counted = bar.model(name, total, total - left) if bar else _Counted(lambda _s: None)
    t0, scores, notes = time.perf_counter(), None, []
    if left or _scored(entry, kl):  # else nothing needs the model: not loaded
        backend = make_sampler(entry)
        try:
            sampler = budget_forced(backend, p.forcing(), name)
            for greedy, params in passes.items():
                def on_sample(k: int, sample: Sample, greedy=greedy) -> None:
                    store.add(name, prompts[k].id, sample, greedy)
                    counted(sample)

                sampler.complete(prompts, params, p.system, on_sample=on_sample,
                                 indices=todo[greedy])
            seconds = time.perf_counter() - t0
            scores, notes = _agreement(entry, backend, kl)
        finally:
            backend.close()
            del backend
    else:
        seconds = 0.0
        scores, notes = _agreement(entry, None, kl)
    judged = [[_judge(_stored(store, name, q, i, False), q, cfg, bench)
               for i in range(p.n)] for q in prompts]
    greedy_judged = None if not p.greedy else [
        _judge(_stored(store, name, q, 0, True), q, cfg, bench) for q in prompts]
    return ModelRun(entry, name, judged, greedy_judged, seconds, scores, notes,
                    counted.samples, counted.tokens)


def _scored(entry, kl: _KL | None) -> bool:
    """Whether `_agreement` scores this model (and so needs it loaded)."""
    return kl is not None and entry.role != "teacher" and entry.kind == "jax"


def _stored(store: SampleStore, name: str, prompt: PromptRecord, index: int,
            greedy: bool) -> Sample:
    row = store.rows.get((name, prompt.id, index, greedy))
    if row is None:
        raise DistillError(f"prompt {prompt.id}: the model returned no "
                           f"{'greedy sample' if greedy else f'sample {index}'}")
    thinking = (Thinking(row["thinking_tokens"], row["forced"], row["waits"])
                if "thinking_tokens" in row else None)
    return Sample(sample_index=index, completion=row["completion"],
                  finish_reason=row["finish_reason"], prompt_tokens=row["prompt_tokens"],
                  completion_tokens=row["completion_tokens"], thinking=thinking)


def _judge(sample: Sample, prompt: PromptRecord, cfg: EvalConfig,
           bench: Benchmark | None = None) -> Outcome:
    """The answer read as `protocol.answer_reading` reads it (`distill.data.benchmarks`): open-r1
    over the whole completion, strict from the text after `</think>` (the whole text without
    tags) as trace generation reads it (a benchmark reads its own way: a letter for GPQA), from
    the text as generated whatever the backend (`generated_text`)."""
    text = generated_text(sample.completion)
    reading = cfg.protocol.answer_reading
    split = split_think(text)
    if bench is not None:
        predicted, correct = bench.judge(text, prompt.reference, reading)
    elif reading == "open-r1":
        predicted, correct = judge_math(text, prompt.reference)
    else:
        predicted = extract_answer(split.answer, cfg.answer_pattern)
        correct = predicted is not None and answers_match(predicted, prompt.reference)
    return Outcome(sample.sample_index, sample.completion, predicted, correct, split.closed,
                   sample.completion_tokens, sample.finish_reason, sample.thinking)


def _agreement(entry, backend, kl: _KL | None) -> tuple[dict | None, list[str]]:
    """The KL / top-1 agreement of a student against traces with top-k (any student when the
    traces keep their tokens' bytes, which align the teacher's tokens to the student's; else
    one that shares the teacher's tokenizer), or its NLL / top-1 agreement on text-only traces
    (any student), else a note."""
    if kl is None:
        return None, []
    if entry.role == "teacher":
        return None, ["KL: not computed for the teacher itself"]
    if entry.kind != "jax":
        return None, ["KL: needs the model in process (an HTTP model gives no logits)"]
    aligned = kl.with_topk and bool(kl.traces) and all(t.top_bytes is not None for t in kl.traces)
    if kl.with_topk and not aligned and kl.fingerprint is None:
        return None, [f"KL: {kl.note}"]
    if kl.with_topk and not aligned and backend.tokenizer.vocabulary_fingerprint() != kl.fingerprint:
        return None, ["KL: the tokenizer differs from the teacher's, and the traces keep no "
                      "token bytes to align the two, so the stored teacher token ids mean "
                      "nothing to this model"]
    scores = agreement(backend.model, backend.tokenizer, kl.traces)
    why = ("top-k rows do not line up with the rendered completion" if kl.with_topk else
           "no assistant text")
    notes = [f"KL: {scores['skipped']} trace(s) skipped ({why})"] if scores["skipped"] else []
    return scores, notes


# ---------------------------------------------------------------------------------------------
# Loss curves and progress


def _loss_curves(cfg: EvalConfig) -> dict[str, Path]:
    """{model name: metrics.jsonl} for the models that have one (given, or in their run dir)."""
    curves = {}
    for entry in cfg.models:
        path = Path(entry.metrics) if entry.metrics else None
        if path is None and entry.kind == "jax":
            run = Path(entry.model)
            path = run / runs.METRICS if runs.is_run(run) else None
        if path is not None and entry.metrics and not path.is_file():
            raise DistillError(f"{path}: metrics file not found (models: {model_name(entry)})")
        if path is not None and path.is_file():
            curves[model_name(entry)] = path
    return curves


class _Counted:
    """An on_sample callback that counts what it sees (samples, generated tokens) and passes each
    sample on to `report`."""

    def __init__(self, report):
        self.report, self.samples, self.tokens = report, 0, 0

    def __call__(self, sample: Sample) -> None:
        self.samples += 1
        self.tokens += sample.completion_tokens
        self.report(sample)


class _Progress:
    """A rich progress bar per model: samples done of all (n per prompt, plus greedy; those an
    earlier run stored count as done), tokens generated and their rate, and the time left."""

    def __init__(self, enabled: bool):
        self.bar = Progress(TextColumn("[bold]eval {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("samples"),
                            TextColumn("· {task.fields[tokens]:,} tokens · {task.fields[tps]:.1f} "
                                       "tok/s ·"), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not enabled)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def model(self, name: str, total: int, done: int = 0) -> _Counted:
        """The on_sample callback of one model's sampling (`done`: samples already stored)."""
        task = self.bar.add_task(name, total=total, completed=done, tokens=0, tps=0.0)
        t0 = time.perf_counter()

        def update(_sample: Sample) -> None:
            tps = counted.tokens / max(time.perf_counter() - t0, 1e-9)
            self.bar.update(task, advance=1, tokens=counted.tokens, tps=tps)

        counted = _Counted(update)
        return counted
