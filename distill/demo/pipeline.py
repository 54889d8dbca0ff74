"""`distill demo`: the whole pipeline at toy scale on a CPU, on data and models it makes itself.

Stages (each through the same library call the matching `distill` command makes):

1. tokenizer  a SentencePiece BPE trained on the task's corpus (`distill.demo.tokenizer`), shared
              by the teacher and the students (`student_tokenizer="other"`: the students get one
              of their own, and the logit losses are GOLD and ULD across the two)
2. teacher    a tiny DeepSeek-V3-shaped MoE trained with distill's trainer on the worked solutions
              of 3-step arithmetic chains (`distill.data.synthetic`, compact style); cached: a
              later run reuses it when its tokenizer, shape and training config are unchanged
3. traces     `run_generate` with the teacher on training prompts: sampled completions, answers
              checked, the correct ones kept with the teacher's top-k log-probabilities
4. students   a smaller dense Llama-shaped student, three times with the same steps and batch:
              SFT on the teacher's traces; SFT + forward-KL logit distillation on the same traces;
              and the baseline: SFT on final answers only (the same prompts' reference answers,
              no reasoning; `write_reference_traces(answers_only=True)`)
5. eval       `run_eval` on held-out problems (a different seed, any question also in the training
              set removed): pass@1 over n samples with a 95% interval, greedy accuracy, for the
              teacher and the three students (and the untrained student in the quick budget)
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
from rich.markup import escape
from rich.table import Table

from distill.config import resolve_path, save_config, validate
from distill.data.prompts import PromptsConfig
from distill.data.synthetic import arithmetic_problems, final_answer, solution_reasoning
from distill.demo.export_check import export_stage, stage_result, summary_line
from distill.demo.tokenizer import OTHER_PIECES, OTHER_VOCAB, train_tokenizer
from distill.errors import DistillError
from distill.eval import metrics
from distill.eval.evaluate import EvalConfig, run_eval
from distill.models.families import active_params, load_model_config
from distill.traces.generate import GenerateConfig, run_generate
from distill.traces.reference import write_reference_traces
from distill.train.config import TrainConfig
from distill.train.loop import run_train

TARGET_RATIO = 0.8  # the student's held-out pass@1 over the teacher's, at least


# ---------------------------------------------------------------------------------------------
# What the demo trains, and for how long


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one model trains: `steps` of `batch_size` packed rows of `seq_len` tokens."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float


@dataclasses.dataclass(frozen=True)
class Budget:
    """Data sizes and training schedules of one demo run. A 3-step problem with its solution is
    about 40 tokens: rows of 128 hold ~2.8 of them, rows of 48 one (at a third of the attention
    cost per token, which is what a student step spends most on here)."""

    chain_steps: int  # operations per arithmetic chain (3 in the full demo)
    train_problems: int  # training prompts (the teacher learns their worked solutions)
    teacher: Schedule
    student: Schedule  # each student: SFT, SFT + KD, answers only
    trace_prompts: int  # training prompts the teacher answers for the students
    eval_prompts: int  # held-out prompts
    eval_n: int  # samples per held-out prompt (plus one greedy)
    eval_untrained: bool  # also evaluate the untrained student (the suite's baseline)


# Measured on a 2-core CPU (full budget, 3-step chains): a 3-layer student distilled for 300 steps
# of 64 x 48 tokens reaches about the teacher's greedy accuracy; at 250 steps it stays near 45%.
BUDGETS = {
    "full": Budget(chain_steps=3, train_problems=20000,
                   teacher=Schedule(steps=300, batch_size=24, seq_len=128, lr=3e-3),
                   student=Schedule(steps=300, batch_size=64, seq_len=48, lr=2e-3),
                   trace_prompts=4096, eval_prompts=200, eval_n=3, eval_untrained=False),
    # the test suite's demo: 2-step chains (about 32 tokens a problem), a fraction of the steps
    "quick": Budget(chain_steps=2, train_problems=1500,
                    teacher=Schedule(steps=100, batch_size=16, seq_len=128, lr=3e-3),
                    student=Schedule(steps=60, batch_size=32, seq_len=48, lr=3e-3),
                    trace_prompts=512, eval_prompts=64, eval_n=2, eval_untrained=True),
}

TRAIN_SEED, EVAL_SEED = 0, 1
TOP_K = 8  # teacher log-probabilities stored per token, and used by the KD loss
MAX_NEW_TOKENS = 48  # a 3-step solution is at most ~40 completion tokens
TRACE_TEMPERATURE = 0.8
# The inference engine of every in-process model (traces, eval): the toy models' KV caches are
# small, so many slots, and a prefill budget that fills them in a few host visits
ENGINE = {"slots": 256, "prefill_budget": 8192}

# A DeepSeek-V3-shaped teacher: MLA attention, one dense layer, then MoE layers of 8 routed experts
# (top-2) and one shared expert. The vocabulary and special ids are the demo tokenizer's.
TEACHER = {
    "family": "deepseek_v3", "hidden_size": 128, "intermediate_size": 384,
    "moe_intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
    "q_lora_rank": None, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
    "v_head_dim": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
    "norm_topk_prob": True, "max_position_embeddings": 256, "rope_theta": 10000.0,
    "rms_norm_eps": 1.0e-6, "tie_word_embeddings": False,
    # rows per expert per dispatch round = tokens x top-k / experts: with training's roughly
    # balanced routing an overflow round is cheaper than a buffer twice that size
    "moe_capacity_factor": 1.0,
}
# The student: a smaller dense Llama (GQA 2). Not Qwen2: transformers 5 always loads a qwen2
# model's tokenizer as its byte-level Qwen2Tokenizer, which cannot read the demo's SentencePiece one.
STUDENT = {
    "family": "llama", "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rope_theta": 10000.0, "rms_norm_eps": 1.0e-6, "tie_word_embeddings": False,
}
STUDENTS = {  # run name: (trace set, loss section, what the table calls it)
    "student-sft": ("traces", {"kind": "sft"}, "student: SFT on traces"),
    "student-kd": ("traces", {"kind": "forward_kl", "alpha": 0.5}, "student: SFT + logit KD"),
    "student-answers": ("answers", {"kind": "sft"}, "student: answers only"),
}
# `--student-tokenizer other`: the students have a vocabulary of their own (`OTHER_PIECES`), so
# logit distillation goes through the alignment of the teacher's tokens to theirs
CROSS_STUDENTS = {
    "student-sft": ("traces", {"kind": "sft"}, "student (own tokenizer): SFT on traces"),
    "student-gold": ("traces", {"kind": "gold", "alpha": 0.5},
                     "student (own tokenizer): SFT + GOLD (matched KL + ULD)"),
    "student-uld": ("traces", {"kind": "uld", "alpha": 0.5},
                    "student (own tokenizer): SFT + ULD"),
}
STUDENT_TOKENIZERS = ("shared", "other")


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Stage:
    name: str
    seconds: float
    result: str


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
    answers = _answers_only(work, b)
    for name, (data, loss, label) in students.items():
        with clock.stage(name, label) as row:
            final = _student(run, name, traces["dir"] if data == "traces" else answers, loss,
                             student, progress)
            row.result = f"{b.student.steps} steps, final loss {final:.3f}"
    with clock.stage("eval", f"{b.eval_prompts} held-out prompts x ({b.eval_n} samples + greedy), "
                             "every model") as row:
        report = _evaluate(run, teacher, student, students, progress)
        row.result = f"report in {work / 'eval'}"
    scores = _scores(report, work / "eval" / "samples.jsonl")
    best = max((n for n, (data, _, _) in students.items() if data == "traces"),
               key=lambda n: scores[n]["pass@1"])
    with clock.stage("export", f"{best} to Hugging Face, read back by distill and transformers"
                     ) as row:
        reload = export_stage(work, best, console)
        row.result = stage_result(reload)
    summary = _summary(run, clock, scores, best, reload, traces, cached)
    _print_summary(console, summary)
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


# verdict: (model, baseline) whose paired difference of per-prompt accuracy it quotes
VERDICTS = {"traces_vs_answers": ("student-sft", "student-answers"),
            "logit_loss": ("student-kd", "student-sft"),
            "gold_vs_sft": ("student-gold", "student-sft"),
            "uld_vs_sft": ("student-uld", "student-sft"),
            "gold_vs_uld": ("student-gold", "student-uld"),
            "sft_vs_untrained": ("student-sft", "student-untrained")}


@dataclasses.dataclass
class Summary:
    """What a demo run found: written to summary.json (`to_dict`), printed as its tables."""

    budget: str  # the budget's name ("custom" for a Budget passed in)
    student_tokenizer: str
    settings: Budget
    teacher_cached: bool
    stages: list[Stage]
    total_seconds: float
    models: dict[str, dict]  # per model: pass@1, ci95, greedy, format, total/active params
    best_student: str
    verdicts: dict  # "<student>/teacher": pass@1 ratio; VERDICTS keys: [difference, half-width]
    export: dict  # the export stage's checks (`distill.demo.export_check`)
    traces: dict  # records, samples, rejected

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _summary(run: _Run, clock: _Clock, scores: dict, best: str, reload: dict, traces: dict,
             cached: bool) -> Summary:
    """The run's figures: `scores` per model (`_scores`), the `best` student, its export check
    `reload`, the `traces` stage's counts and whether the teacher was `cached`."""
    return Summary(budget=run.budget_name, student_tokenizer=run.student_tokenizer,
                   settings=run.budget, teacher_cached=cached, stages=list(clock.stages),
                   total_seconds=clock.elapsed(), models=_models(scores, _model_params(run.work)),
                   best_student=best, verdicts=_verdicts(scores), export=reload,
                   traces={k: v for k, v in traces.items() if k != "dir"})


def _verdicts(scores: dict) -> dict:
    """Each trained student's pass@1 over the teacher's, and the paired differences VERDICTS
    names (where both models ran)."""
    teacher = scores["teacher"]["pass@1"]
    verdicts = {}
    trained = [n for n in scores if n not in ("teacher", "student-untrained", "student-answers")]
    for name in trained:
        verdicts[f"{name}/teacher"] = scores[name]["pass@1"] / teacher if teacher else 0.0
    pp = {n: s["per_prompt"] for n, s in scores.items()}
    for key, (a, b_) in VERDICTS.items():
        if a in pp and b_ in pp:  # a list, as JSON reads it back
            verdicts[key] = list(metrics.paired_difference(pp[a], pp[b_]))
    return verdicts


def _models(scores: dict, params: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Per model its scores (without the per-prompt ones) and its total and active parameters."""
    models = {}
    for name, s in scores.items():
        total_p, active_p = params["teacher" if name == "teacher" else "student"]
        models[name] = {k: v for k, v in s.items() if k != "per_prompt"}
        models[name].update(total_params=total_p, active_params=active_p)
    return models


def _print_summary(console, s: Summary) -> None:
    n = s.settings.eval_n
    table = Table(title=f"distill demo ({s.budget} budget): held-out accuracy, "
                        f"{s.settings.eval_prompts} prompts")
    for col in ("model", f"pass@1 (n={n}) [95% CI]", "greedy", "params (active)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    students = CROSS_STUDENTS if s.student_tokenizer == "other" else STUDENTS
    labels = {"teacher": "teacher (MoE, worked solutions)",
              **{n: label for n, (_, _, label) in students.items()},
              "student-untrained": "student: untrained"}
    for name, m in s.models.items():
        lo, hi = m["ci95"]
        params = f"{m['total_params'] / 1e6:.2f}M ({m['active_params'] / 1e6:.2f}M)"
        table.add_row(labels.get(name, name), f"{m['pass@1']:.1%} [{lo:.1%}, {hi:.1%}]",
                      "-" if m["greedy"] is None else f"{m['greedy']:.1%}", params)
    console.print(table)

    stages = Table(title=f"time per stage (total {s.total_seconds:.0f} s)")
    for col in ("stage", "seconds", "result"):
        stages.add_column(col, justify="right" if col == "seconds" else "left")
    for st in s.stages:
        stages.add_row(st.name, f"{st.seconds:.1f}", st.result)
    console.print(stages)
    for line in verdict_lines(s):
        console.print(line)


def verdict_lines(s: Summary) -> list[str]:
    """The summary's conclusions, one line each."""
    v = s.verdicts
    best = s.best_student
    ratio = v[f"{best}/teacher"]
    ok = "[green]met[/]" if ratio >= TARGET_RATIO else "[red]not met[/]"
    lines = [f"student/teacher ({best}, pass@1) = {ratio:.0%} (target >= "
             f"{TARGET_RATIO:.0%}): {ok}"]
    if "traces_vs_answers" in v:
        d, h = v["traces_vs_answers"]
        lines.append(f"traces vs answers-only (same student, steps and batch): {100 * d:+.1f} "
                     f"points (95% CI +/- {100 * h:.1f})"
                     + (" [green]clearly above[/]" if d - h > 0 else ""))
    for key, what in (("logit_loss", "logit loss added to SFT"),
                      ("gold_vs_sft", "GOLD (across tokenizers) added to SFT"),
                      ("uld_vs_sft", "ULD (across tokenizers) added to SFT"),
                      ("gold_vs_uld", "GOLD vs ULD")):
        if key in v:
            d, h = v[key]
            helped = "helped" if d - h > 0 else "hurt" if d + h < 0 else (
                "made no clear difference (within noise)")
            if key == "gold_vs_uld":
                helped = ("GOLD ahead" if d - h > 0 else "ULD ahead" if d + h < 0
                          else "no clear difference (within noise)")
            lines.append(f"{what}: {helped}, {100 * d:+.1f} points (95% CI +/- {100 * h:.1f})")


    lines.append(escape(summary_line(s.export)))  # plain text: "[hf]" is not a style
    return lines
