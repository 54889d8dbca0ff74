"""`distill demo`: the whole pipeline at toy scale on a CPU, on data and models it makes itself.

Stages (each through the same library call the matching `distill` command makes):

1. tokenizer  a SentencePiece BPE trained on the task's corpus (`distill.demo.tokenizer`), shared
              by the teacher and the students (`student_tokenizer="other"`: the students get one
              of their own; the logit losses are GOLD and ULD across the two, and on-policy
              scores the student's completions on byte-aligned spans)
2. teacher    a tiny DeepSeek-V3-shaped MoE trained with distill's trainer on the worked solutions
              of 3-step arithmetic chains (`distill.data.synthetic`, compact style); cached: a
              later run reuses it when its tokenizer, shape and training config are unchanged
3. traces     `run_generate` with the teacher on the first `trace_prompts` training prompts:
              sampled completions, answers checked, the correct ones kept with the teacher's
              top-k log-probabilities. Few of them (the R1 regime: the teacher outclasses an SFT
              student; `distill.demo.budgets`)
4. students   a smaller dense Llama-shaped student, four times with the same total steps and
              batch: SFT on the teacher's traces; SFT + off-policy KD (forward KL on the stored
              top-k plus the tail bucket); SFT for part of the steps, then on-policy for the rest
              (the student samples fresh training prompts, the in-process teacher scores its
              tokens; `distill.train` `onpolicy:`); and the baseline: SFT on final answers only
              (`write_reference_traces(answers_only=True)`)
5. eval       `run_eval` on held-out problems (a different seed, any question also in the training
              set removed): pass@1 over n samples with a 95% interval, greedy accuracy, for the
              teacher and the students (and the untrained student in the quick budget), each with
              its paired difference against SFT alone (`distill.demo.summary`)
6. export     the best distilled student to a Hugging Face directory, read back by distill and,
              where transformers is installed, reloaded with transformers (AutoModelForCausalLM +
              AutoTokenizer): logits, the rendered chat template, its token ids and 32 greedy
              tokens are compared with distill's (`distill.demo.export_check`)

Everything lives under the work directory (default students/demo, relative to the working
directory): the stage configs are written to configs/ there, every path in them absolute, so each
stage can be rerun by hand with the matching `distill` command from any directory.

The demo needs no download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from rich.console import Console

from distill.config import resolve_path, save_config, validate
from distill.data.prompts import PromptsConfig
from distill.data.synthetic import arithmetic_problems, final_answer, solution_reasoning
from distill.demo.budgets import (
    BUDGETS,
    CROSS_STUDENTS,
    ENGINE,
    EVAL_SEED,
    MAX_NEW_TOKENS,
    STUDENT,
    STUDENT_TOKENIZERS,
    STUDENTS,
    TEACHER,
    TOP_K,
    TRACE_TEMPERATURE,
    TRAIN_SEED,
    Budget,
    Schedule,
)
from distill.demo.export_check import export_stage, stage_result
from distill.demo.summary import Stage, Summary, models, onpolicy_stats, print_summary, verdicts
from distill.demo.tokenizer import OTHER_PIECES, OTHER_VOCAB, train_tokenizer
from distill.errors import DistillError
from distill.eval.evaluate import EvalConfig, run_eval
from distill.models.families import active_params, load_model_config
from distill.traces.generate import GenerateConfig, run_generate
from distill.traces.reference import write_reference_traces
from distill.train.config import TrainConfig
from distill.train.loop import run_train

# ---------------------------------------------------------------------------------------------
# The run


class _Clock:
    """Times each stage; the rows of the timing table."""

    def __init__(self, console):
        self.console = console
        self.stages: list[Stage] = []
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the clock started (the demo's total)."""
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def stage(self, name: str, doing: str):
        t0 = time.perf_counter()
        row = Stage(name, 0.0, "")
        self.console.print(f"[bold cyan]{name}[/]: {doing}")
        yield row
        row.seconds = time.perf_counter() - t0
        self.stages.append(row)
        self.console.print(f"  done in {row.seconds:.1f} s: {row.result}")


@dataclasses.dataclass(frozen=True)
class _Run:
    """One demo run's settings: where it works, its budget (and the budget's name) and whose
    tokenizer the students have ("shared": the teacher's, "other": their own)."""

    work: Path
    budget: Budget
    budget_name: str
    student_tokenizer: str


@dataclasses.dataclass(frozen=True)
class _StudentModel:
    """The students' starting point: their model preset (random weights) and tokenizer folder."""

    preset: Path
    tokenizer: Path


def _setup(work_dir: str | Path, budget: str | Budget, student_tokenizer: str,
           fresh: bool) -> _Run:
    """The run's settings, checked; its work directory made (emptied first with `fresh`)."""
    if isinstance(budget, Budget):
        b, budget = budget, "custom"
    elif budget in BUDGETS:
        b = BUDGETS[budget]
    else:
        raise DistillError(f"unknown demo budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    if student_tokenizer not in STUDENT_TOKENIZERS:
        raise DistillError(f"unknown student tokenizer {student_tokenizer!r}; choose one of "
                           f"{', '.join(STUDENT_TOKENIZERS)}")
    work = Path(resolve_path(work_dir))
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return _Run(work, b, budget, student_tokenizer)


def run_demo(work_dir: str | Path = "students/demo", budget: str | Budget = "full", *,
             fresh: bool = False, progress: bool = True, console=None,
             student_tokenizer: str = "shared") -> Summary:
    """Run every stage (see the module doc) under `work_dir`, print the summary and return its
    figures (also written to `work_dir`/summary.json). `budget`: "full", "quick" or a Budget;
    `fresh` deletes `work_dir` first (the cached teacher included). `student_tokenizer`:
    "shared" (the teacher's) or "other" (the students' own: SFT vs SFT + GOLD vs SFT + ULD)."""

    run = _setup(work_dir, budget, student_tokenizer, fresh)
    work, b = run.work, run.budget
    cross = student_tokenizer == "other"
    students = CROSS_STUDENTS if cross else STUDENTS
    console = console or Console()
    clock = _Clock(console)

    with clock.stage("tokenizer", "SentencePiece BPE on the task's corpus") as row:
        tok = _tokenizer(work, b)
        student_tok = _tokenizer(work, b, "student-tokenizer") if cross else tok
        row.result = f"{len(tok)} tokens, R1 chat template" + (
            f"; the students' own: {len(student_tok)} tokens" if cross else "")
    presets = _write_presets(work, tok, student_tok)
    student = _StudentModel(presets["student"],
                            work / ("student-tokenizer" if cross else "tokenizer"))
    with clock.stage("teacher", "tiny MoE trained on worked solutions (cached after a run)") as row:
        teacher, cached = _teacher(work, b, presets["teacher"], progress)
        row.result = ("cached: " if cached else "trained: ") + str(teacher)
    with clock.stage("traces", "the teacher solves training prompts; correct answers kept") as row:
        traces = _traces(work, b, teacher, progress)
        row.result = (f"{traces['records']} correct of {traces['samples']} samples "
                      f"({traces['records'] / max(traces['samples'], 1):.0%}), top-{TOP_K} "
                      "log-probs per token")
    data = {"traces": traces["dir"], "answers": _answers_only(work, b)}
    for name, (source, loss, label) in students.items():
        with clock.stage(name, label) as row:
            if source == "onpolicy":
                row.result = _onpolicy_student(run, name, data["traces"], teacher, student,
                                               progress)
            else:
                final = _student(run, name, data[source], loss, student, progress)
                row.result = f"{b.student.steps} steps, final loss {final:.3f}"
    with clock.stage("eval", f"{b.eval_prompts} held-out prompts x ({b.eval_n} samples + greedy), "
                             "every model") as row:
        report = _evaluate(run, teacher, student, students, progress)
        row.result = f"report in {work / 'eval'}"
    scores = _scores(report, work / "eval" / "samples.jsonl")
    best = max((n for n, (data, _, _) in students.items() if data != "answers"),
               key=lambda n: scores[n]["pass@1"])
    with clock.stage("export", f"{best} to Hugging Face, read back by distill and transformers"
                     ) as row:
        reload = export_stage(work, best, console)
        row.result = stage_result(reload)
    summary = _summary(run, clock, scores, best, reload, traces, cached)
    print_summary(console, summary)
    (work / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    console.print(f"every stage's config is in {work / 'configs'}; rerun one with its command "
                  f"from any directory, e.g. distill eval {work / 'configs' / 'eval.yaml'}")
    return summary


# ---------------------------------------------------------------------------------------------
# Stages


def _prompts(b: Budget, **extra) -> dict:
    """The training prompts' config (the synthetic chains, seed 0)."""
    return {"source": "synthetic", "synthetic": {"n": b.train_problems, **_chains(b)}, **extra}


def _chains(b: Budget, seed: int = TRAIN_SEED) -> dict:
    """The synthetic problems' settings (`arithmetic_problems` keywords)."""
    return {"seed": seed, "min_steps": b.chain_steps, "max_steps": b.chain_steps,
            "style": "compact"}


def _tokenizer(work: Path, b: Budget, name: str = "tokenizer"):
    """Train the tokenizer on the training problems with their solutions ("student-tokenizer":
    the students' own, with fewer merges and pieces)."""
    problems = arithmetic_problems(min(b.train_problems, 2000), **_chains(b))
    corpus = [f"{p.question}\n{solution_reasoning(p)}\n</think>\n\n{final_answer(p)}"
              for p in problems]
    if name == "student-tokenizer":
        return train_tokenizer(corpus, work / name, OTHER_VOCAB, OTHER_PIECES)
    return train_tokenizer(corpus, work / name)


def _write_presets(work: Path, tok, student_tok=None) -> dict[str, Path]:
    """Model preset YAMLs for the teacher and the student, each sized to its tokenizer (the
    student's: `tok` unless it has its own)."""
    out = {}
    for name, shape, t in (("teacher", TEACHER, tok), ("student", STUDENT, student_tok or tok)):
        ids = {"vocab_size": len(t), "bos_token_id": t.bos_token_id,
               "eos_token_id": t.eos_token_id}
        out[name] = _write_yaml(work / "presets" / f"{name}.yaml", {"model": {**shape, **ids}})
    return out


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _write_config(schema, path: Path, data: dict) -> Path:
    """A stage's config, validated and saved with every path absolute (`save_config`), so
    `distill <stage> path` reruns it from any directory."""
    return save_config(validate(schema, data, str(path)), path)


def _train_config(work: Path, name: str, init: Path, traces: Path, sched: Schedule, loss: dict,
                  tokenizer: Path | None = None) -> Path:
    """A training run's config (`init`: a model preset), written under `work`/configs; a logit
    loss reads the teacher's top-k entries, SFT none."""
    top_k = TOP_K if loss["kind"] != "sft" else 0
    cfg = {"name": name,
           "student": {"init": str(init), "tokenizer": str(tokenizer or work / "tokenizer")},
           "data": {"traces": [str(traces)], "seq_len": sched.seq_len,
                    "batch_size": sched.batch_size, "top_k": top_k},
           "loss": loss,
           "optim": {"lr": sched.lr, "warmup_steps": max(1, sched.steps // 20), "weight_decay": 0.01},
           "train": {"steps": sched.steps, "log_every": max(1, sched.steps // 10),
                     "checkpoint_every": sched.steps,
                     "async_checkpoints": False},
           "output_root": str(work)}

    return _write_config(TrainConfig, work / "configs" / f"{name}.yaml", cfg)


def _train(config: Path, progress: bool) -> float:
    """Train a run from scratch on one device; returns the last logged loss."""

    cfg = yaml.safe_load(config.read_text())
    run_dir = Path(cfg["output_root"]) / cfg["name"]
    if run_dir.exists():  # the trainer would resume: start over
        shutil.rmtree(run_dir)
    result = run_train(config, progress=progress, devices=jax.devices()[:1])
    return result.losses[-1]


def _teacher(work: Path, b: Budget, preset: Path, progress: bool) -> tuple[Path, bool]:
    """The trained teacher run dir, and whether it was reused from an earlier run."""
    run_dir = work / "teacher"
    data = work / "data" / "reference"
    cfg = _train_config(work, "teacher", preset, data, b.teacher, {"kind": "sft"})
    key = _cache_key(cfg, preset, work / "tokenizer" / "tokenizer.json", _prompts(b))
    stamp = run_dir / "demo-cache.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return run_dir, True
    write_reference_traces(PromptsConfig.model_validate(_prompts(b)), data)
    _train(cfg, progress)
    stamp.write_text(json.dumps({"key": key}) + "\n")
    return run_dir, False


def _cache_key(config: Path, preset: Path, tokenizer: Path, prompts: dict) -> str:
    """What the teacher depends on: its training config, shape, tokenizer and training prompts."""
    h = hashlib.sha256()
    for part in (config.read_bytes(), preset.read_bytes(), tokenizer.read_bytes(),
                 json.dumps(prompts, sort_keys=True).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _traces(work: Path, b: Budget, teacher: Path, progress: bool) -> dict:
    """Teacher traces of the first `trace_prompts` training prompts (one sample each)."""
    cfg = {"name": "traces", "prompts": _prompts(b, limit=b.trace_prompts),
           "teacher": {"kind": "jax", "model": str(teacher), "engine": ENGINE},
           "sampling": {"n": 1, "temperature": TRACE_TEMPERATURE, "top_p": 1.0,
                        "max_new_tokens": MAX_NEW_TOKENS, "seed": 0, "logprobs": TOP_K},
           "filters": {"keep": "correct", "dedup": "exact"},
           "output": {"root": str(work), "prompts_per_shard": 1000}}
    summary = run_generate(_write_config(GenerateConfig, work / "configs" / "traces.yaml", cfg),
                           overwrite=True, progress=progress)
    if summary.records == 0:
        raise DistillError(f"{summary.run_dir}: the teacher solved none of {summary.samples} "
                           "prompts; train it for more steps")
    return {"dir": summary.run_dir, "records": summary.records, "samples": summary.samples,
            "rejected": summary.rejected}


def _answers_only(work: Path, b: Budget) -> Path:
    """The baseline's data: the same prompts as the traces, with the reference answer and no
    reasoning."""
    prompts = PromptsConfig.model_validate(_prompts(b, limit=b.trace_prompts))
    return write_reference_traces(prompts, work / "data" / "answers-only", answers_only=True)


def _student(run: _Run, name: str, traces: Path, loss: dict, student: _StudentModel,
             progress: bool) -> float:
    """Train student `name` on `traces` with `loss`; returns its last logged loss."""
    cfg = _train_config(run.work, name, student.preset, traces, run.budget.student, loss,
                        student.tokenizer)
    return _train(cfg, progress)


def _onpolicy_student(run: _Run, name: str, traces: Path, teacher: Path, student: _StudentModel,
                      progress: bool) -> str:
    """SFT on `traces` for the budget's `onpolicy.sft_steps` (run `name`-sft), then on-policy
    from there for the rest of the student's steps (run `name`); returns the stage's result."""
    b, op = run.budget, run.budget.onpolicy
    first = f"{name}-sft"
    sft = dataclasses.replace(b.student, steps=op.sft_steps)
    cfg = _train_config(run.work, first, student.preset, traces, sft, {"kind": "sft"},
                        student.tokenizer)
    _train(cfg, progress)
    final = _train(_onpolicy_config(run, name, run.work / first, teacher, student.tokenizer),
                   progress)
    s = onpolicy_stats(run.work / name)
    return (f"{op.sft_steps} SFT + {b.student.steps - op.sft_steps} on-policy steps, final loss "
            f"{final:.3f}; reverse KL on own samples {s['kl_start']:.3f} -> {s['kl_end']:.3f}")


def _onpolicy_config(run: _Run, name: str, init: Path, teacher: Path, tokenizer: Path) -> Path:
    """The on-policy phase's training config: no traces (every step on-policy), the training
    prompts sampled by the student from `init` and scored by the in-process `teacher`."""
    b, op = run.budget, run.budget.onpolicy
    steps = b.student.steps - op.sft_steps
    cfg = {"name": name,
           "student": {"init": str(init), "tokenizer": str(tokenizer)},
           "onpolicy": {"prompts": _prompts(b),
                        "teacher": {"kind": "jax", "model": str(teacher), "engine": ENGINE},
                        "fraction": 1.0, "group_size": op.group_size,
                        "prompts_per_step": op.prompts_per_step,
                        "max_new_tokens": MAX_NEW_TOKENS, "loss": op.loss},
           "optim": {"lr": op.lr, "warmup_steps": max(1, steps // 20), "weight_decay": 0.01},
           "train": {"steps": steps, "log_every": max(1, steps // 10),
                     "checkpoint_every": steps, "async_checkpoints": False},
           "output_root": str(run.work)}
    return _write_config(TrainConfig, run.work / "configs" / f"{name}.yaml", cfg)


def _eval_prompts(work: Path, b: Budget) -> Path:
    """Held-out problems as a JSONL file: seed EVAL_SEED, minus any question the training set
    has (a chain drawn twice would otherwise test memory, not reasoning), each question once."""
    seen = {p.question for p in arithmetic_problems(b.train_problems, **_chains(b))}
    fresh = []
    for p in arithmetic_problems(10 * b.eval_prompts, **_chains(b, EVAL_SEED)):
        if p.question not in seen and len(fresh) < b.eval_prompts:
            fresh.append(p)
            seen.add(p.question)  # each held-out question once
    if len(fresh) < b.eval_prompts:
        raise DistillError(f"only {len(fresh)} held-out problems of {b.chain_steps} steps are not "
                           f"training problems; lower eval_prompts or train_problems")
    rows = [{"id": p.id, "prompt": p.question, "answer": p.answer} for p in fresh]
    path = work / "data" / "eval-prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _evaluate(run: _Run, teacher: Path, student: _StudentModel, students: dict,
              progress: bool) -> dict:
    work, b = run.work, run.budget
    models = [{"name": "teacher", "model": str(teacher), "role": "teacher", "engine": ENGINE}]
    models += [{"name": n, "model": str(work / n), "engine": ENGINE} for n in students]
    if b.eval_untrained:
        models.append({"name": "student-untrained", "model": str(student.preset),
                       "tokenizer": str(student.tokenizer), "engine": ENGINE})
    cfg = {"name": "demo", "prompts": {"source": str(_eval_prompts(work, b))}, "models": models,
           "protocol": {"n": b.eval_n, "temperature": 0.6, "top_p": 0.95,
                        "max_new_tokens": MAX_NEW_TOKENS, "seed": 0, "greedy": True},
           "output": str(work / "eval")}
    return run_eval(_write_config(EvalConfig, work / "configs" / "eval.yaml", cfg),
                    progress=progress)


def _scores(report: dict, samples: Path) -> dict:
    """Per model: pass@1 and its interval, greedy accuracy, and per-prompt accuracies (for
    paired differences between models)."""
    per_prompt: dict[str, dict[str, list[bool]]] = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        if not row["greedy"]:
            per_prompt.setdefault(row["model"], {}).setdefault(row["prompt_id"], []).append(
                row["correct"])
    out = {}
    for m in report["models"]:
        prompts = per_prompt.get(m["name"], {})
        out[m["name"]] = {"pass@1": m["pass@1"]["value"], "ci95": m["pass@1"]["ci95"],
                          "greedy": m["greedy"]["value"] if m["greedy"] else None,
                          "format": m["format"],
                          "per_prompt": {k: float(np.mean(v)) for k, v in prompts.items()}}
    return out


# ---------------------------------------------------------------------------------------------
# Summary


def _model_params(work: Path) -> dict[str, tuple[int, int]]:
    return {name: active_params(load_model_config(work / "presets" / f"{name}.yaml"))
            for name in ("teacher", "student")}


def _summary(run: _Run, clock: _Clock, scores: dict, best: str, reload: dict, traces: dict,
             cached: bool) -> Summary:
    """The run's figures: `scores` per model (`_scores`), the `best` student, its export check
    `reload`, the `traces` stage's counts and whether the teacher was `cached`."""
    op_run = run.work / "student-onpolicy"
    onpolicy = onpolicy_stats(op_run) if "student-onpolicy" in scores else {}
    return Summary(budget=run.budget_name, student_tokenizer=run.student_tokenizer,
                   settings=run.budget, teacher_cached=cached, stages=list(clock.stages),
                   total_seconds=clock.elapsed(), models=models(scores, _model_params(run.work)),
                   best_student=best, verdicts=verdicts(scores), export=reload,
                   traces={k: v for k, v in traces.items() if k != "dir"},
                   onpolicy=onpolicy)
