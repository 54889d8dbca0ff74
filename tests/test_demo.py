"""`distill demo`: its tokenizer (exact round trip, the R1 chat template, transformers agrees) and
the reduced demo end to end, run from a fresh copy of the repository with its defaults: every stage
writes its outputs, the distilled student beats the untrained one, the export reloads in
transformers (and without transformers the last stage skips that check in one line), the
configs it wrote rerun from another directory, and a second run reuses the cached teacher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from distill.data.synthetic import arithmetic_problems, final_answer, solution_reasoning
from distill.demo.budgets import BUDGETS, STUDENTS
from distill.demo.pipeline import _teacher
from distill.demo.tokenizer import BOS, EOS, train_tokenizer
from distill.errors import DistillError
from distill.models.families import active_params
from tests.helpers import environment, run_cli

SYNTH = {"min_steps": 3, "max_steps": 3, "style": "compact"}


def solutions(n: int, seed: int) -> list[str]:
    return [f"{p.question}\n{solution_reasoning(p)}\n</think>\n\n{final_answer(p)}"
            for p in arithmetic_problems(n, seed=seed, **SYNTH)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo-tok")
    train_tokenizer(solutions(500, seed=0), path)
    return path


def test_tokenizer_round_trips_solutions_exactly(tok_dir):
    from distill.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tok_dir)
    unseen = solutions(200, seed=7) + ["12  +3\n\n\n *2 -0", "\\boxed{243}"]
    for text in unseen:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    # digits are never merged (a number is spelled digit by digit); the answer opening is one piece
    assert [tok.id_to_token(i) for i in tok.encode("\\boxed{243}")] == [
        "\\boxed{", "2", "4", "3", "}"]
    assert len(tok) <= 64


def test_tokenizer_chat_template_and_special_tokens(tok_dir):
    from distill.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tok_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "7 +3 *2"}],
                                   add_generation_prompt=True)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>7 +3 *2<｜Assistant｜><think>\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and tok.bos_token == BOS and tok.eos_token == EOS
    assert [tok.id_to_token(i) for i in ids[1:2] + ids[-3:]] == [
        "<｜User｜>", "<｜Assistant｜>", "<think>", "\n"]
    assert tok.encode(EOS) == [tok.eos_token_id]
    assert tok.encode("x", add_special_tokens=True) == tok.encode("x")  # BOS comes from the template


def test_tokenizer_loads_in_transformers_with_the_same_ids(tok_dir):
    from distill.tokenizer import Tokenizer

    ours = Tokenizer.from_pretrained(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "user", "content": "4 -1 *3 +9"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    for sample in [text, *solutions(20, seed=3)]:
        assert theirs.encode(sample, add_special_tokens=False) == ours.encode(sample)


def test_tokenizer_on_an_empty_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(DistillError, match="demo tokenizer"):
        train_tokenizer([], tmp_path / "tok")


def test_active_params_of_the_moe_teacher(tmp_path):
    from distill.demo.pipeline import _write_presets
    from distill.models.families import load_model_config, param_count
    from distill.tokenizer import Tokenizer

    tok = train_tokenizer(solutions(100, seed=0), tmp_path / "tok")
    presets = _write_presets(tmp_path, tok)
    teacher = load_model_config(presets["teacher"])
    student = load_model_config(presets["student"])
    total, active = active_params(teacher)
    moe_layers = teacher.num_hidden_layers - teacher.first_k_dense_replace
    idle_experts = teacher.n_routed_experts - teacher.num_experts_per_tok
    assert total == param_count(teacher)
    assert total - active == moe_layers * idle_experts * 3 * teacher.hidden_size * (
        teacher.moe_intermediate_size)
    assert active_params(student) == (param_count(student),) * 2
    assert param_count(student) < active < total  # a smaller dense student
    assert teacher.vocab_size == student.vocab_size == len(Tokenizer.from_pretrained(
        tmp_path / "tok"))


# ---------------------------------------------------------------------------------------------
# The reduced demo, end to end, run as a newcomer runs it: `distill demo` from the root of a fresh
# copy of the repository, with the default (relative) work directory students/demo.

REPO = Path(__file__).resolve().parents[1]


def fresh_clone(dest: Path) -> Path:
    """The repository's files as a clean clone has them (tracked and not ignored), artifacts and
    caches left out."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def distill_cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The console script `make setup` installed, as a newcomer runs it."""
    return run_cli(args, cwd=cwd, env=env, timeout=1200, script=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = fresh_clone(tmp_path_factory.mktemp("clone"))
    # a newcomer's shell: no fake devices, a cold compilation cache of its own
    env = {"XLA_FLAGS": None, "JAX_PLATFORMS": "cpu",
           "DISTILL_CACHE": str(tmp_path_factory.mktemp("cache")), "COLUMNS": "160"}
    proc = distill_cli("demo", "--quick", "--quiet", cwd=root, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    work = root / "students" / "demo"
    summary = json.loads((work / "summary.json").read_text())
    return {"root": root, "work": work, "env": env, "summary": summary, "printed": proc.stdout}


@pytest.mark.slow
def test_quick_demo_configs_rerun_from_another_directory(quick, tmp_path):
    """Each config the demo wrote means the same from anywhere: eval gives the same report, the
    finished trace run and training run resume as complete, and nothing lands in the cwd."""
    configs = quick["work"] / "configs"
    before = json.loads((quick["work"] / "eval" / "eval.json").read_text())
    for command, config in (("eval", "eval.yaml"), ("generate", "traces.yaml"),
                            ("train", "student-sft.yaml")):
        proc = distill_cli(command, str(configs / config), "--quiet", cwd=tmp_path,
                           env=quick["env"])
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    after = json.loads((quick["work"] / "eval" / "eval.json").read_text())
    before.pop("timing"), after.pop("timing")
    assert after == before
    assert proc.stdout.strip() == str(quick["work"] / "student-sft")
    assert not list(tmp_path.iterdir())  # every output went where the configs say


@pytest.mark.slow
def test_quick_demo_last_stage_without_transformers(quick):
    """On a plain install (no torch, no transformers) every module but the benchmarks imports,
    and the demo's last stage exports, checks with distill, and says in one line what it skipped."""
    script = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {str(REPO / "tests")!r})
import hidden_modules
hidden_modules.hide("torch", "transformers")
import distill
for info in pkgutil.walk_packages(distill.__path__, "distill."):
    if info.name.split(".")[1] != "bench":
        importlib.import_module(info.name)
assert not {{"torch", "transformers"}} & set(sys.modules), "torch / transformers imported"
from pathlib import Path
from rich.console import Console
from distill.demo.export_check import export_stage, summary_line
e = export_stage(Path("students/demo"), {quick["summary"]["best_student"]!r}, Console(width=300))
print(summary_line(e))
print("diff", e["distill_logit_diff"])
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=quick["root"],
                          env=environment(quick["env"]), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if "skipped the transformers" in line]
    assert skipped == ["  skipped the transformers reload check: torch and transformers not "
                       "installed; pip install 'distill[hf]' to run it"], proc.stdout
    assert float(proc.stdout.split("diff ")[-1]) < 1e-5  # distill reads its export back


@pytest.mark.slow
def test_quick_demo_student_beats_the_untrained_student(quick):
    models = quick["summary"]["models"]
    sft, untrained = models["student-sft"], models["student-untrained"]
    print({name: (m["pass@1"], m["greedy"]) for name, m in models.items()})
    assert sft["pass@1"] > untrained["pass@1"] and sft["greedy"] > untrained["greedy"]
    assert models["teacher"]["pass@1"] > untrained["pass@1"]


@pytest.mark.slow
def test_quick_demo_stages_write_their_outputs(quick):
    work, s = quick["work"], quick["summary"]
    assert [st["name"] for st in s["stages"]] == [
        "tokenizer", "teacher", "traces", *STUDENTS, "eval", "export"]
    assert not s["teacher_cached"]
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    assert (work / "teacher" / "checkpoints" / str(BUDGETS["quick"].teacher.steps)).is_dir()
    manifest = json.loads((work / "traces" / "manifest.json").read_text())
    assert manifest["totals"]["records"] == s["traces"]["records"] > 0
    from distill.data.store import read_table

    rows = read_table(work / "traces").to_pylist()
    assert all(r["correct"] for r in rows)
    assert len(rows[0]["top_ids"]) == rows[0]["completion_tokens"]
    assert len(rows[0]["top_ids"][0]) == 8
    b = BUDGETS["quick"]
    for name in STUDENTS:
        steps = b.student.steps - (b.onpolicy.sft_steps if name == "student-onpolicy" else 0)
        assert (work / name / "checkpoints" / str(steps)).is_dir(), name
    sft_first = work / "student-onpolicy-sft" / "checkpoints" / str(b.onpolicy.sft_steps)
    assert sft_first.is_dir()  # the on-policy student's SFT phase, then its on-policy phase
    assert set(s["onpolicy"]) == {f"{k}_{e}" for k in ("kl", "entropy", "length")
                                  for e in ("start", "end")}
    report = json.loads((work / "eval" / "eval.json").read_text())
    assert {m["name"] for m in report["models"]} == {"teacher", *STUDENTS, "student-untrained"}
    assert report["prompts"]["count"] == BUDGETS["quick"].eval_prompts
    printed = quick["printed"]
    assert "best distilled student" in printed and "off-policy KD added to SFT" in printed
    assert "answers only, against SFT on traces" in printed
    assert "SFT then on-policy, against SFT alone" in printed and "reverse KL on own" in printed
    assert {"kd_vs_sft", "onpolicy_vs_sft", "answers_vs_sft", "teacher_vs_sft"} <= set(
        s["verdicts"])


@pytest.mark.slow
def test_quick_demo_eval_prompts_are_not_training_prompts(quick):
    prompts = [json.loads(x) for x in (quick["work"] / "data" / "eval-prompts.jsonl").read_text()
               .splitlines()]
    train = {p.question for p in arithmetic_problems(BUDGETS["quick"].train_problems, seed=0,
                                                     **SYNTH)}
    assert len(prompts) == BUDGETS["quick"].eval_prompts
    assert not {p["prompt"] for p in prompts} & train


@pytest.mark.slow
def test_quick_demo_export_reloads_in_transformers(quick):
    e = quick["summary"]["export"]
    assert e["max_logit_diff"] < 1e-4 and e["template_equal"]
    assert e["hf_ids_equal"]  # the prompt's ids, special tokens included, as distill made them
    assert e["greedy_equal"] and e["greedy_tokens"] == 32
    theirs = transformers.AutoModelForCausalLM.from_pretrained(e["dir"])
    assert theirs.config.model_type == "llama"
    assert (quick["work"] / "export" / "README.md").is_file()


@pytest.mark.slow
def test_quick_demo_reuses_the_cached_teacher(quick):
    from distill.demo.pipeline import _write_presets
    from distill.tokenizer import Tokenizer

    work = quick["work"]
    ckpt = work / "teacher" / "checkpoints"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir())
    presets = _write_presets(work, Tokenizer.from_pretrained(work / "tokenizer"))
    run_dir, cached = _teacher(work, BUDGETS["quick"], presets["teacher"], progress=False)
    assert cached and run_dir == work / "teacher"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir()) == before


@pytest.mark.slow
def test_quick_demo_with_students_of_another_tokenizer(quick):
    """`--student-tokenizer other` in the same work directory (the teacher is reused): the
    students train on their own vocabulary, GOLD and ULD distil through the alignment of the
    teacher's tokens to theirs, and the summary compares them with SFT. Runs last: it rewrites
    the work directory's eval and summary."""
    from distill.demo.budgets import CROSS_STUDENTS
    from distill.tokenizer import Tokenizer

    proc = distill_cli("demo", "--quick", "--quiet", "--student-tokenizer", "other",
                       cwd=quick["root"], env=quick["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    work = quick["work"]
    s = json.loads((work / "summary.json").read_text())
    assert s["teacher_cached"] and s["student_tokenizer"] == "other"
    assert [st["name"] for st in s["stages"]] == [
        "tokenizer", "teacher", "traces", *CROSS_STUDENTS, "eval", "export"]
    teacher_tok = Tokenizer.from_pretrained(work / "tokenizer")
    student_tok = Tokenizer.from_pretrained(work / "student-gold" / "tokenizer")
    assert teacher_tok.vocabulary_fingerprint() != student_tok.vocabulary_fingerprint()
    assert teacher_tok.token_to_id("\\boxed{") is not None
    assert student_tok.token_to_id("\\boxed{") is None  # seven tokens on the student's side
    for name in ("student-gold", "student-uld"):
        logged = [json.loads(x) for x in (work / name / "metrics.jsonl").read_text().splitlines()]
        kd = [m["kd"] for m in logged if "kd" in m]
        assert kd and kd[-1] < kd[0], name  # a teacher term, and it fell
    assert {"gold_vs_sft", "uld_vs_sft", "gold_vs_uld", "onpolicy_vs_sft"} <= set(s["verdicts"])
    # on-policy across tokenizers: the teacher scored the student's samples span by span
    logged = [json.loads(x) for x in
              (work / "student-onpolicy" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(m["sampled_reverse_kl"]) for m in logged)
    assert "GOLD (across tokenizers) added to SFT" in proc.stdout
