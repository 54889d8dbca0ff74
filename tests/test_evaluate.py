"""`distill eval`: the metrics on hand-computed cases, the interval's coverage by simulation, and
end to end on toy models (in process and over HTTP): outputs, reproducibility, teacher agreement
checked against transformers, bad input in one line."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.data.prompts import PromptsConfig, load_prompts
from distill.errors import DistillError
from distill.eval import metrics as M
from distill.eval.evaluate import run_eval
from distill.sampling import sample_seed

from . import toy
from .helpers import assert_user_error, invoke_cli

REPO = Path(__file__).resolve().parents[1]
Z = 1.959963984540054
PROMPTS = {"source": "synthetic", "synthetic": {"n": 6, "seed": 1}}
K, SEED = 3, 5


# ---------------------------------------------------------------------------------------------
# Metrics, by hand


def test_pass_at_1_is_the_mean_of_per_prompt_accuracies():
    correct = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert M.pass_at_1(correct) == pytest.approx((0.75 + 0 + 1) / 3)


def test_interval_hand_computed():
    # per-prompt accuracies 1, 0, 0.5: p = 0.5, sd^2 = 0.25, SE^2 = 0.25 / 3, n_eff = 3;
    # Wilson at n = 3 is centred on 0.5 with half-width z / (1 + z^2/3) * sqrt(0.25/3 + z^2/36)
    correct = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]]
    half = Z / (1 + Z**2 / 3) * np.sqrt(0.25 / 3 + Z**2 / 36)
    assert M.effective_n(correct) == pytest.approx(3.0)
    assert M.pass_at_1_ci(correct) == pytest.approx((0.5 - half, 0.5 + half))
    assert M.pass_at_1_ci(correct) == pytest.approx((0.125334, 0.874666), abs=1e-6)
    # all wrong: not an empty interval; the Wilson bound over the P * k = 4 samples
    assert M.pass_at_1_ci([[0, 0], [0, 0]]) == pytest.approx((0.0, Z**2 / (4 + Z**2)))
    # the same accuracy over more prompts gives a narrower interval
    lo1, hi1 = M.pass_at_1_ci([[1, 0]] * 5 + [[0, 0]] * 5)
    lo2, hi2 = M.pass_at_1_ci([[1, 0]] * 50 + [[0, 0]] * 50)
    assert lo1 < lo2 < 0.25 < hi2 < hi1


def test_cons_at_k_hand_computed():
    answers = [["12", "12", "7", None],  # 12 wins 2:1 and is right
               ["3", "4", " 4 ", None],  # 4 wins (spacing ignored) but 3 is right
               [None, None, None, None],  # no answer: wrong
               ["9", "8", "$8$", "9."]]  # 9 and 8 tie 2:2: the first seen (9) is voted, wrong
    correct = [[True, True, False, False], [True, False, False, False],
               [False] * 4, [False, True, True, False]]
    assert M.cons_correct(answers, correct) == [True, False, False, False]
    assert M.cons_at_k(answers, correct) == 0.25
    assert M.majority_vote(["\\frac{1}{2}", "5", "\\frac12"]) in (0, 2)
    assert M.majority_vote(["x", "y"]) == 0 and M.majority_vote([None]) is None


def test_format_and_lengths():
    assert M.think_closed("reasoning\n</think>\n\nanswer")  # the template opened <think>
    assert M.think_closed("<think>\nr\n</think>\n\na")
    assert not M.think_closed("<think>\nno end") and not M.think_closed("plain answer")
    stats = M.length_stats([10, 20, 30, 40, 100])
    assert stats == {"mean": 40.0, "p50": 30.0, "p90": pytest.approx(76.0)}


def test_accuracy_by_difficulty():
    out = M.by_difficulty([[1, 1], [0, 1], [0, 0]], [2, 10, 2])
    assert list(out) == ["2", "10"]
    assert out["2"]["prompts"] == 2 and out["2"]["pass@1"] == 0.5
    assert out["10"]["pass@1"] == 0.5 and M.by_difficulty([[1]], [None]) == {}


@pytest.mark.parametrize("a, b, prompts, k", [(1.2, 1.8, 60, 4), (0.5, 4.5, 100, 1),
                                              (0.3, 0.3, 40, 8)])
def test_interval_covers_the_true_accuracy_about_95_percent_of_the_time(a, b, prompts, k):
    """A simulated model: each trial draws prompts whose probabilities of a correct sample are
    Beta(a, b), then k samples each; the true pass@1 is a / (a + b)."""
    rng = np.random.default_rng(0)
    truth, trials, hits = a / (a + b), 2000, 0
    for _ in range(trials):
        p = rng.beta(a, b, prompts)
        lo, hi = M.pass_at_1_ci(rng.random((prompts, k)) < p[:, None])
        hits += lo <= truth <= hi
    assert 0.92 <= hits / trials <= 0.98


# ---------------------------------------------------------------------------------------------
# End to end


def oracle_answer(reference: str, seed: int, temperature: float) -> str:
    """The HTTP oracle model: always right when greedy; sampled, right unless seed % 3 == 0, and
    then wrong with one of two answers."""
    if temperature == 0 or seed % 3:
        return reference
    return str(int(reference) + 1 + seed % 2)


def oracle_app(references: dict[str, str]):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        ref = references[body["messages"][-1]["content"]]
        answer = oracle_answer(ref, body["seed"], body["temperature"])
        text = f"<think>\nworking\n</think>\n\nThe answer is \\boxed{{{answer}}}."
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 20, "completion_tokens": 7}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return toy.qwen2_dir(root / "student"), toy.deepseek_dir(root / "teacher")


@pytest.fixture(scope="module")
def prompts():
    return load_prompts(PromptsConfig.model_validate(PROMPTS))


def top_k_rows(rng, rows: int, k: int = 3):
    ids = np.stack([rng.choice(320, k, replace=False) for _ in range(rows)]).astype(np.int32)
    lps = np.sort(np.log(rng.dirichlet(np.ones(k + 1), rows)[:, :k]), axis=1)[:, ::-1]
    return ids, lps.astype(np.float32)


def write_traces(run_dir: Path, prompts, teacher_dir: Path) -> dict:
    """One trace per prompt with top-3 log-probabilities lined up with the rendered completion
    (as many rows as completion tokens, or one fewer), plus one that does not line up."""
    from distill.data.render import render_example
    from distill.tokenizer import Tokenizer
    from distill.traces.store import TraceStore

    tok = Tokenizer.from_pretrained(teacher_dir)
    rng = np.random.default_rng(3)
    rows, expected = [], {}
    for i, p in enumerate(prompts + prompts[:1]):
        reasoning, answer = f"{i} + 3 = {i + 3}", "The answer is \\boxed{20}."
        ids, mask = render_example(tok, p.prompt, reasoning, answer)
        completion = int(mask.sum())
        n = completion - (i % 2) if i < len(prompts) else completion + 3  # the last: misaligned
        top_ids, top_lps = top_k_rows(rng, n)
        if i < len(prompts):
            expected[p.id] = (ids, int(np.argmax(mask)), top_ids, top_lps)
        rows.append({
            "id": f"{p.id}#{i // len(prompts)}", "prompt_id": p.id, "sample_index": i // len(prompts),
            "prompt": p.prompt, "messages": None, "reasoning": reasoning, "answer": answer,
            "completion": f"{reasoning}\n</think>\n\n{answer}", "reference": p.reference,
            "predicted": "20", "correct": p.reference == "20", "finish_reason": "stop",
            "prompt_tokens": int(np.argmax(mask)), "completion_tokens": n, "teacher": "jax:toy",
            "sampling": {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64, "seed": 0},
            "meta": None, "top_ids": top_ids.tolist(), "top_logprobs": top_lps.tolist()})
    store = TraceStore.open(run_dir, {"test": "kl"})
    store.set_info(teacher={"kind": "jax", "model": str(teacher_dir)})
    store.add_shard(0, rows, {"prompts": len(prompts), "samples": len(rows), "rejected": {},
                              "prompt_tokens": 0, "completion_tokens": 0})
    store.finish("# test traces\n")
    return expected


def write_config(path: Path, student: Path, teacher: Path, url: str, out: Path, **extra) -> Path:
    cfg = {"prompts": PROMPTS,
           "models": [{"name": "student", "model": str(student),
                       "metrics": str(path.parent / "metrics.jsonl")},
                      {"name": "oracle", "kind": "openai", "base_url": url, "model": "oracle"},
                      {"name": "teacher", "model": str(teacher), "role": "teacher"}],
           "protocol": {"n": K, "max_new_tokens": 16, "seed": SEED},
           "kl": {"traces": str(path.parent / "traces"), "max_samples": 64},
           "output": str(out), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dirs, prompts):
    """Two runs of the same config (and seed), with the oracle served over HTTP."""
    from distill.serve.app import ServerThread

    student, teacher = dirs
    work = tmp_path_factory.mktemp("eval")
    expected_kl = write_traces(work / "traces", prompts, teacher)
    (work / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in (1, 2, 3, 4))
        + json.dumps({"step": 4, "heldout_loss": 1.1}) + "\n")
    references = {p.prompt: p.reference for p in prompts}
    with ServerThread(oracle_app(references)) as url:
        cfg = write_config(work / "eval.yaml", student, teacher, f"{url}/v1", work / "out")
        first = run_eval(cfg, progress=False)
        first_samples = (work / "out" / "samples.jsonl").read_text()
        second = run_eval(cfg, progress=False)
    return {"work": work, "first": first, "second": second, "first_samples": first_samples,
            "expected_kl": expected_kl, "student": student}


def by_name(report: dict) -> dict:
    return {m["name"]: m for m in report["models"]}


def test_report_files(evaluated):
    out = evaluated["work"] / "out"
    report = json.loads((out / "eval.json").read_text())
    assert report == evaluated["second"] and report["prompts"]["count"] == 6
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 6 * (K + 1)  # models x prompts x (k samples + greedy)
    assert collections.Counter((x["model"], x["greedy"]) for x in lines) == {
        (m, g): 6 * (1 if g else K) for m in ("student", "oracle", "teacher") for g in (0, 1)}
    for name in ("accuracy_ci", "accuracy_by_difficulty", "lengths", "loss_curve"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "eval.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| metric"))
    assert header == "| metric | student | oracle | **teacher** (teacher) |"
    assert f"| pass@1 (n={K}) [95% CI] |" in table and "| top-1 agreement |" in table
    assert not list(out.parent.glob(".out.*"))  # no temporary folder left behind


def test_same_seed_same_numbers(evaluated):
    first, second = dict(evaluated["first"]), dict(evaluated["second"])
    assert set(first.pop("timing")) == {"student", "oracle", "teacher"}
    second.pop("timing")
    assert first == second
    assert (evaluated["work"] / "out" / "samples.jsonl").read_text() == evaluated["first_samples"]


def test_metrics_of_a_model_of_known_answers(evaluated, prompts):
    """The oracle's answers are known from its request seeds: pass@1, cons@n, greedy, format
    and lengths follow by hand."""
    oracle = by_name(evaluated["first"])["oracle"]
    per_prompt, votes = [], []
    for p in prompts:
        answers = [oracle_answer(p.reference, sample_seed(SEED, p.id, i), 0.6) for i in range(K)]
        per_prompt.append(np.mean([a == p.reference for a in answers]))
        counts = collections.Counter(answers)
        top = max(counts.values())
        votes.append(next(a for a in answers if counts[a] == top) == p.reference)
    assert 0 < np.mean(per_prompt) < 1  # the case is not trivial
    assert oracle["pass@1"]["value"] == pytest.approx(np.mean(per_prompt))
    lo, hi = oracle["pass@1"]["ci95"]
    assert lo < oracle["pass@1"]["value"] < hi
    assert oracle["cons@n"]["value"] == pytest.approx(np.mean(votes))
    assert oracle["greedy"]["value"] == 1.0 and oracle["format"] == 1.0
    assert oracle["lengths"] == {"mean": 7.0, "p50": 7.0, "p90": 7.0}
    assert sum(v["prompts"] for v in oracle["by_difficulty"].values()) == 6
    assert evaluated["first"]["timing"]["oracle"]["generated_tokens"] == 7 * 6 * (K + 1)


def test_kl_and_top1_agreement_match_transformers(evaluated):
    """The student shares the teacher's tokenizer: its KL and top-1 agreement on the traces equal
    the same quantities computed from transformers' logits of the toy checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    models = by_name(evaluated["first"])
    got = models["student"]["agreement"]
    hf = AutoModelForCausalLM.from_pretrained(evaluated["student"], dtype=torch.float32)
    kls, hits = [], []
    for ids, first, top_ids, top_lps in evaluated["expected_kl"].values():
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids.tolist()])).logits[0], -1).numpy()
        for j in range(len(top_ids)):
            pos = first - 1 + j  # the position that predicts completion token j
            q = np.exp(top_lps[j] - np.logaddexp.reduce(top_lps[j]))
            kls.append(np.sum(q * (np.log(q) - logp[pos, top_ids[j]])))
            hits.append(np.argmax(logp[pos]) == top_ids[j][np.argmax(top_lps[j])])
    assert got["traces"] == 6 and got["skipped"] == 1 and got["tokens"] == len(kls)
    assert got["kl"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(np.mean(hits))
    assert models["teacher"]["agreement"] is None and models["teacher"]["notes"]
    assert models["oracle"]["agreement"] is None and "HTTP" in models["oracle"]["notes"][0]


def test_kl_and_top1_agreement_across_tokenizers(tmp_path, dirs):
    """Traces of a teacher with another vocabulary that keep their tokens' bytes: scored at the
    first student token of each aligned span whose teacher top-1 is a student token (a
    reference loop over `align` here); with the student's own tokenizer, the byte path scores
    what the id path does."""
    import jax
    import jax.numpy as jnp

    from distill.chat import completion_text
    from distill.data.align import align
    from distill.data.render import render_example
    from distill.data.traces import Trace
    from distill.eval.agreement import agreement
    from distill.pretrained import load_pretrained
    from distill.tokenizer import Tokenizer

    model, tok = load_pretrained(dirs[0])
    # bytes only (256 + 6 special ids): each student token of several bytes is a span
    other = Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path / "other", vocab_size=262))
    reasoning, answer = "12 + 3 = 15, then 15 * 2 = 30.", "The answer is \\boxed{30}."
    rng = np.random.default_rng(5)

    def trace(teacher):
        sampled = teacher.encode(completion_text(reasoning, answer))
        top = np.stack([[i, *rng.choice(teacher.vocab_size, 2, replace=False)] for i in sampled])
        lps = np.sort(np.log(rng.dirichlet(np.ones(4), len(sampled))[:, :3]), 1)[:, ::-1]
        table = teacher.token_bytes()
        return Trace("t", "p", "What is 12 + 3, times 2?", reasoning, answer, top.astype(np.int32),
                     lps.astype(np.float32), [table[i] for i in sampled],
                     [[table[i] for i in row] for row in top])

    crossed = trace(other)
    got = agreement(model, tok, [crossed])
    ids, mask = render_example(tok, crossed.prompt, reasoning, answer)
    first = int(np.argmax(mask))
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]))[0], -1), np.float64)
    spans = align(crossed.token_bytes, [tok.token_bytes()[i] for i in ids[first:-1]])
    by_bytes, kls, hits = tok.ids_by_bytes(), [], []
    for row, j in zip(spans.teacher_start, spans.student_start, strict=True):
        entries = [by_bytes.get(b) for b in crossed.top_bytes[row]]
        if entries[0] is None:  # the teacher's top-1 is no student token: not scored
            continue
        q = np.exp(crossed.top_logprobs[row] - np.logaddexp.reduce(crossed.top_logprobs[row]))
        pos = first + j - 1
        kls.append(sum(qk * (np.log(qk) - logp[pos, e]) for qk, e in zip(q, entries, strict=True)
                       if e is not None))
        hits.append(np.argmax(logp[pos]) == entries[0])
    assert kls and ((spans.teacher_stop - spans.teacher_start) > 1).any()  # the two differ
    assert got["traces"] == 1 and got["tokens"] == len(kls)
    assert got["kl"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(np.mean(hits))

    own = trace(tok)
    ids_only = Trace(**{**own.__dict__, "token_bytes": None, "top_bytes": None})
    a, b = agreement(model, tok, [own]), agreement(model, tok, [ids_only])
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-5) and a["tokens"] == b["tokens"] > 0
    assert a["top1_agreement"] == b["top1_agreement"]


def test_a_different_tokenizer_is_not_scored(tmp_path):
    from pydantic import TypeAdapter

    from distill.eval.config import ModelEntry
    from distill.eval.evaluate import _KL, _agreement
    from distill.tokenizer import Tokenizer

    same = [Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path / n)) for n in ("a", "b")]
    other = Tokenizer.from_pretrained(toy.write_tokenizer(tmp_path / "c", vocab_size=300))
    assert same[0].vocabulary_fingerprint() == same[1].vocabulary_fingerprint()
    assert other.vocabulary_fingerprint() != same[0].vocabulary_fingerprint()

    class Backend:
        tokenizer = other

    entry = TypeAdapter(ModelEntry).validate_python({"model": "x"})  # kind jax by default
    scores, notes = _agreement(entry, Backend(),
                               _KL([], True, same[0].vocabulary_fingerprint(), None))
    assert scores is None and "tokenizer differs" in notes[0]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_no_prompts_in_common_is_one_line_and_exit_2(tmp_path, dirs):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({
        "prompts": {**PROMPTS, "split": "heldout", "heldout_fraction": 0.0},
        "models": [{"model": str(dirs[0])}, {"model": str(dirs[1]), "role": "teacher"}],
        "output": str(tmp_path / "out")}))
    line = assert_user_error(invoke_cli(["eval", cfg, "--quiet"], cwd=REPO), "no prompts left")
    assert line.startswith("error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"models": [{"model": "no/such/model"}]}, "models.0.model: not found: {tmp}/no/such/model"),
    ({"models": [{"kind": "vllm", "model": "x"}]}, "models.0: kind must be jax"),
    ({"models": [{"model": "m", "colour": 1}]}, "models.0.colour: unknown key"),
    ({"models": [{"model": "a/m"}, {"model": "b/m"}]}, "two models are named 'm'"),
    ({"protocol": {"n": 0}}, "protocol.n"),
    ({"models": [{"model": "student", "metrics": "nope.jsonl"}]},
     "models.0.metrics: not found: {tmp}/nope.jsonl"),
    ({"kl": {"traces": "no-traces"}}, "kl.traces: not found: {tmp}/no-traces"),
    ({"prompts": {"source": "nope.jsonl"}}, "prompts.source: not found: {tmp}/nope.jsonl"),
    ({"prompts": {"source": "p.jsonl", "columns": {"reference": None}}}, "has no reference answer"),
])
def test_bad_config_is_one_clear_error(tmp_path, dirs, change, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = message.format(tmp=tmp_path)
    (tmp_path / "student").symlink_to(dirs[0])
    for same_name in ("a/m", "b/m"):
        (tmp_path / same_name).mkdir(parents=True)
    cfg = {"prompts": {**PROMPTS, "format": "synthetic"}, "models": [{"model": "student"}],
           "output": str(tmp_path / "out"), **change}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "p.jsonl").write_text('{"prompt": "What is 2 + 2?"}\n')
    with pytest.raises(DistillError, match=message.replace(".", r"\.")) as e:
        run_eval(path, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_kl_traces_without_top_k_are_refused(tmp_path, dirs, prompts):
    write_traces(tmp_path / "traces", prompts, dirs[1])
    (tmp_path / "metrics.jsonl").write_text("")
    path = write_config(tmp_path / "eval.yaml", *dirs, "http://127.0.0.1:9", tmp_path / "out")
    with pytest.raises(DistillError, match="no trace with teacher top-k log-probabilities for "
                                           "the evaluated prompts"):
        run_eval(path, ["prompts.synthetic.seed=99"], progress=False)


def test_paired_difference():
    a = {"p1": 1.0, "p2": 0.5, "p3": 1.0, "p4": 0.0}
    b = {"p1": 0.0, "p2": 0.5, "p3": 0.5, "p4": 0.0, "only-b": 1.0}
    d, half = M.paired_difference(a, b)
    diffs = np.array([1.0, 0.0, 0.5, 0.0])
    assert d == pytest.approx(diffs.mean())
    assert half == pytest.approx(M.z_value(0.95) * diffs.std(ddof=1) / 2)  # z = 1.95996
