"""`distill eval`: students and the teacher side by side on the same held-out prompts.

Every model (in process or over HTTP) samples `protocol.n` completions per prompt (and one greedy
completion), each is checked against the reference answer, and the report gives per model: pass@1
with a 95% interval, cons@n, greedy accuracy, format compliance (a closed think block), response
lengths, generated tokens/s, accuracy by difficulty, and, for students sharing the teacher's
tokenizer, per-token KL and top-1 agreement on the teacher's traces (see
`distill.eval.metrics` and `distill.eval.agreement` for the definitions).

Generated tokens/s is over a model's whole sampling time (greedy pass included; for a model in
process, JIT compilation too).

Reproducible: sampling is seeded (per batch of prompts in process, per request over HTTP), so the
same config and seed give the same report; wall-clock numbers live apart, under "timing".

Outputs (in `output`, default students/eval/<name>/), written into a temporary folder and moved
into place at the end, so a report directory is never half-written:
eval.json, eval.md, samples.jsonl (one line per model, prompt and sample) and plots/*.png.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from distill import runs
from distill.backends import make_sampler
from distill.backends.forcing import budget_forced
from distill.chat import split_think
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
    teacher agreement (or None) and notes on what was skipped."""

    entry: object
    name: str
    samples: list[list[Outcome]]
    greedy: list[Outcome] | None
    seconds: float
    agreement: dict | None
    notes: list[str]


def load_eval_config(path: str | Path, overrides=(), *, check_paths: bool = False) -> EvalConfig:
    """The validated config; errors name the file and the dotted key (models.N.key).
    `check_paths`: every input path (models, prompts, traces, metrics) must exist."""
    return load_config(EvalConfig, path, overrides, check_paths=check_paths)


def run_eval(config_path: str | Path | None, overrides=(), *, progress: bool = True,
             data: dict | None = None) -> dict:
    """Evaluate the models a config lists and write the report; returns the eval.json content.
    `data`: the config as a mapping instead of a file (`distill eval --benchmark`)."""
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
    prompts = (load_benchmark(bench, cfg.benchmark.source, cfg.protocol.seed, cfg.benchmark.limit)
               if bench else load_prompts(cfg.prompts))
    _check_references(prompts, config_path)
    _check_models(cfg)
    kl = _prepare_kl(cfg, prompts)
    curves = _loss_curves(cfg)
    runs = []
    with _Progress(progress) as bar:
        for entry in cfg.models:
            runs.append(evaluate_model(entry, prompts, cfg, kl, bar, bench))
            gc.collect()  # free one model's buffers before the next one loads
    report = build_report(name, out_dir, cfg, prompts, runs)
    write_outputs(out_dir, report, runs, prompts, curves)
    return report


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
                   bar=None, bench: Benchmark | None = None) -> ModelRun:
    """Sample, check and (when it applies) score one model."""
    name = model_name(entry)
    p = cfg.protocol
    params = p.params()
    greedy_params = params.greedy()
    backend = make_sampler(entry)
    try:
        on_sample = bar.model(name, len(prompts) * (p.n + p.greedy)) if bar else None
        t0 = time.perf_counter()
        sampler = budget_forced(backend, p.forcing(), name)
        samples = sampler.complete(prompts, params, p.system, on_sample=on_sample)
        greedy = (sampler.complete(prompts, greedy_params, p.system, on_sample=on_sample)
                  if p.greedy else None)
        seconds = time.perf_counter() - t0
        scores, notes = _agreement(entry, backend, kl)
    finally:
        backend.close()
        del backend
    judged = [[_judge(s, prompt, cfg.answer_pattern, bench)
               for s in _in_order(group, p.n, prompt)]
              for prompt, group in zip(prompts, samples, strict=True)]
    greedy_judged = None if greedy is None else [
        _judge(_in_order(g, 1, prompt)[0], prompt, cfg.answer_pattern, bench)
        for prompt, g in zip(prompts, greedy, strict=True)]
    return ModelRun(entry, name, judged, greedy_judged, seconds, scores, notes)


def _in_order(group: list[Sample], n: int, prompt: PromptRecord) -> list[Sample]:
    if len(group) != n:
        raise DistillError(f"prompt {prompt.id}: the model returned {len(group)} samples, "
                           f"expected {n}")
    return sorted(group, key=lambda s: s.sample_index)


def _judge(sample: Sample, prompt: PromptRecord, pattern: str | None,
           bench: Benchmark | None = None) -> Outcome:
    """The final answer is read from the text after `</think>` (the whole text without tags),
    as trace generation reads it (a benchmark reads it its own way: a letter for GPQA)."""
    split = split_think(sample.completion)
    if bench is not None:
        predicted = bench.extract(split.answer)
        correct = bench.matches(predicted, prompt.reference)
    else:
        predicted = extract_answer(split.answer, pattern)
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


class _Progress:
    """A rich progress bar per model: samples done of all (n per prompt, plus greedy)."""

    def __init__(self, enabled: bool):
        self.bar = Progress(TextColumn("[bold]eval {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("samples · {task.fields[tps]:.1f} tok/s"),
                            console=Console(stderr=True), disable=not enabled)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def model(self, name: str, total: int):
        """The on_sample callback of one model's sampling."""
        task = self.bar.add_task(name, total=total, tps=0.0)
        t0, tokens = time.perf_counter(), [0]

        def on_sample(sample: Sample) -> None:
            tokens[0] += sample.completion_tokens
            tps = tokens[0] / max(time.perf_counter() - t0, 1e-9)
            self.bar.update(task, advance=1, tps=tps)

        return on_sample

