"""Benchmark presets for `distill eval`: sources, prompts, answer reading, GPQA's shuffle, the
R1 protocol defaults, published numbers, and `distill eval --benchmark` in process and over HTTP."""

from __future__ import annotations

import collections
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distill
from distill.config import validate
from distill.data.benchmarks import (
    BENCHMARKS,
    GPQA_TEMPLATE,
    MATH_TEMPLATE,
    benchmark,
    gpqa_position,
    load_benchmark,
    published,
)
from distill.errors import DistillError
from distill.eval.config import EvalConfig, benchmark_config
from distill.eval.evaluate import run_eval
from tests import public_datasets as pub
from tests import toy
from tests.helpers import assert_user_error, invoke_cli, run_cli

FIXTURES = {"math500": pub.math500, "aime24": pub.aime24, "aime25": pub.aime25, "gpqa": pub.gpqa,
            "gsm8k": pub.gsm8k}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {name: str(build(root / f"{name}.parquet")) for name, build in FIXTURES.items()}


# (benchmark, a completion's answer part, the answer read, the reference, judged correct)
EXTRACTION = [
    ("math500", "Therefore, the final answer is: $\\boxed{7}$. I hope it is correct", "7", "7",
     True),
    ("math500", "So $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "0.5", True),
    ("math500", "First \\boxed{3}, then correcting: \\boxed{4}", "4", "4", True),  # the last
    ("math500", "It is \\boxed{5", None, "5", False),  # malformed: never closed
    ("math500", "The answer is 7.", None, "7", False),  # no box: nothing read
    ("math500", "\\boxed{8}", "8", "9", False),  # wrong
    ("aime24", "Therefore, the final answer is: $\\boxed{033}$.", "033", "33", True),
    ("aime25", "So $\\boxed{27}$ or maybe \\boxed{}", "27", "27", True),  # an empty box skipped
    ("aime25", "Therefore, the final answer is: $\\boxed{26}$.", "26", "27", False),
    ("gsm8k", "He has 1,234 apples.\n#### 1,234", "1,234", "1234", True),
    ("gsm8k", "So \\boxed{1234}.", "1234", "1234", True),
    ("gsm8k", "#### 12 and then\n#### 13", "13", "12", False),
    ("gsm8k", "The answer is twelve", None, "12", False),
    ("gpqa", "B) looks wrong, C) too.\nAnswer: D", "D", "D", True),
    ("gpqa", "**Answer: B**", "B", "C", False),
    ("gpqa", "Thus the answer is (A).", "A", "A", True),
    ("gpqa", "Answer: $C$", "C", "C", True),
    ("gpqa", "\\boxed{B}", "B", "B", True),
    ("gpqa", "Option B seems best, though A) is close.", None, "B", False),
    ("gpqa", "Answer: A\nWait, no. Answer: C", "C", "C", True),
    ("gpqa", "Answer: E", None, "A", False),  # not a choice
    ("gpqa", "Answer: A looks tempting, but \\boxed{C}", "C", "C", True),  # the last one
    ("gpqa", "Answer: $\\text{(C)}$", "C", "C", True),
    ("gpqa", "Answer: $\\mathrm{B}$", "B", "B", True),
    ("gpqa", "\\boxed{\\textbf{(D)}}", "D", "D", True),
    ("gpqa", "Answer: Because it decays", None, "B", False),
]


@pytest.mark.parametrize("name, text, expected, reference, correct", EXTRACTION)
def test_strict_answer_extraction(name, text, expected, reference, correct):
    b = benchmark(name)
    assert b.extract(text) == expected
    assert b.matches(b.extract(text), reference) is correct
    # judge: strict reads the text after </think>, here the whole (tagless) text
    assert b.judge(text, reference, "strict") == (expected, correct)
    assert b.judge(f"{text} 8 \\boxed{{9}}\n</think>\n\n{text}", reference,
                   "strict") == (expected, correct)


@pytest.mark.parametrize("name, want", [
    ("MATH-500", "math500"), ("math", "math500"), ("AIME_2024", "aime24"), ("aime2025", "aime25"),
    ("GPQA-Diamond", "gpqa"), ("gpqa_d", "gpqa"), ("GSM8K", "gsm8k")])
def test_names_and_aliases(name, want):
    """Case, "-" and "_" are ignored; each benchmark's aliases are registered with it."""
    assert benchmark(name) is BENCHMARKS[want]
    with pytest.raises(DistillError, match=r"^unknown benchmark 'mmlu' \(known: math500, "
                                           r"aime24, aime25, gpqa, gsm8k\)$"):
        benchmark("mmlu")


def test_gpqa_strict_shuffle_is_seeded_and_balanced(local):
    positions = [gpqa_position(i, seed=0) for i in range(198)]
    counts = collections.Counter(positions)
    assert max(counts.values()) - min(counts.values()) <= 1  # 198 = 4 * 49 + 2
    assert positions == [gpqa_position(i, seed=0) for i in range(198)]
    assert positions != [gpqa_position(i, seed=1) for i in range(198)]
    records = load_benchmark(BENCHMARKS["gpqa"], local["gpqa"], seed=0, reading="strict")
    again = load_benchmark(BENCHMARKS["gpqa"], local["gpqa"], seed=0, reading="strict")
    other = load_benchmark(BENCHMARKS["gpqa"], local["gpqa"], seed=5, reading="strict")
    assert [r.prompt for r in records] == [r.prompt for r in again]
    assert [r.prompt for r in records] != [r.prompt for r in other]
    for i, r in enumerate(records):
        assert r.id == f"rec{i:03d}"
        # the correct answer sits at the reference letter; the four choices are all there
        lines = dict(re.findall(r"^([ABCD])\) (.*)$", r.prompt, re.M))
        assert lines[r.reference] == f"right {i}"
        assert sorted(lines.values()) == sorted([f"right {i}"] + [f"wrong {i}{c}" for c in "abc"])
        head = GPQA_TEMPLATE.split("{prompt}")[0]
        assert r.prompt.startswith(head + f"Which particle number {i} is right?\n\nA) ")


def test_gpqa_braces_and_whitespace_survive(tmp_path):
    """strict strips GPQA's stray whitespace; open-r1 keeps the cells as lighteval at the pin
    does (default_prompts.py:825-826: formatted as they are)."""
    row = {c: "" for c in pub.GPQA_COLUMNS} | {
        "Question": " Water boils at $100\\,^\\circ\\mathrm{C}$ {A}? \n",
        "Correct Answer": "$\\mathrm{C}$ \n", "Incorrect Answer 1": "{B}",
        "Incorrect Answer 2": "$\\mathbf{D}$", "Incorrect Answer 3": "none", "Record ID": "r1"}
    path = tmp_path / "gpqa.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    [record] = load_benchmark(BENCHMARKS["gpqa"], str(path), reading="strict")
    assert "Water boils at $100\\,^\\circ\\mathrm{C}$ {A}?\n\nA) " in record.prompt
    lines = dict(re.findall(r"^([ABCD])\) (.*)$", record.prompt, re.M))
    assert lines[record.reference] == "$\\mathrm{C}$"
    assert sorted(lines.values()) == sorted(["$\\mathrm{C}$", "{B}", "$\\mathbf{D}$", "none"])
    [kept] = load_benchmark(BENCHMARKS["gpqa"], str(path))  # open-r1, the default
    assert "answering.\n\n Water boils at $100\\,^\\circ\\mathrm{C}$ {A}? \n\n\nA) " in kept.prompt
    assert kept.reference == "D"  # the first randint(0, 3) after seed 1234 is 3
    assert kept.prompt.endswith("\n\nA) {B}\nB) $\\mathbf{D}$\nC) none\nD) $\\mathrm{C}$ \n")


def test_each_benchmark_loads_from_a_local_copy(local):
    math = load_benchmark(BENCHMARKS["math500"], local["math500"])
    assert [r.id for r in math] == [f"test/prealgebra/{100 + i}.json" for i in range(4)]
    assert math[0].prompt == MATH_TEMPLATE.replace("{prompt}", "What is $1 + 2$?")
    assert "clearly.  The last line" in math[0].prompt  # lighteval's two spaces
    assert [r.reference for r in math] == ["3", "7", "11", "15"]
    assert [r.id for r in load_benchmark(BENCHMARKS["aime24"], local["aime24"])] == [
        "60", "61", "62"]
    assert [r.reference for r in load_benchmark(BENCHMARKS["aime25"], local["aime25"])] == [
        "8", "27", "64"]
    gsm = load_benchmark(BENCHMARKS["gsm8k"], local["gsm8k"], limit=2)
    assert [r.reference for r in gsm] == ["7", "1234"]
    assert gsm[0].prompt.endswith("put your final answer within \\boxed{}.")
    with pytest.raises(DistillError, match=r"not MATH-500 \(no column 'problem'; columns: "
                                           r"question, answer\)"):
        load_benchmark(BENCHMARKS["math500"], local["gsm8k"])


def test_protocol_defaults_come_from_the_benchmark_unless_set(local):
    base = benchmark_config("aime24", "students/x", source=local["aime24"])
    cfg = validate(EvalConfig, base, "test")
    assert (cfg.protocol.n, cfg.protocol.max_new_tokens, cfg.protocol.temperature,
            cfg.protocol.top_p) == (64, 32768, 0.6, 0.95)
    cfg = validate(EvalConfig, {**base, "protocol": {"n": 2}}, "test")
    assert (cfg.protocol.n, cfg.protocol.max_new_tokens) == (2, 32768)
    assert validate(EvalConfig, benchmark_config("gpqa-diamond", "m"), "t").protocol.n == 8
    with pytest.raises(DistillError, match="benchmark.name: Value error, unknown benchmark "
                                           "'mmlu'"):
        validate(EvalConfig, benchmark_config("math500", "m") | {"benchmark": {"name": "mmlu"}},
                 "t")
    with pytest.raises(DistillError, match="give either prompts or benchmark"):
        validate(EvalConfig, {"models": [{"model": "m"}]}, "t")


def test_answer_reading_defaults_open_r1_for_benchmarks_and_strict_for_prompts(local):
    base = benchmark_config("gpqa", "m", source=local["gpqa"])
    assert validate(EvalConfig, base, "t").protocol.answer_reading == "open-r1"
    strict = validate(EvalConfig, {**base, "protocol": {"answer_reading": "strict"}}, "t")
    assert strict.protocol.answer_reading == "strict" and strict.protocol.n == 8
    prompts = {"prompts": {"source": "synthetic"}, "models": [{"model": "m"}]}
    assert validate(EvalConfig, prompts, "t").protocol.answer_reading == "strict"
    with pytest.raises(DistillError, match="answer_pattern goes with protocol.answer_reading: "
                                           "strict"):
        validate(EvalConfig, {**base, "answer_pattern": "= (\\d+)"}, "t")
    with pytest.raises(DistillError, match="protocol.answer_reading: Input should be 'open-r1' "
                                           "or 'strict'"):
        validate(EvalConfig, {**prompts, "protocol": {"answer_reading": "lighteval"}}, "t")


def test_published_numbers_by_model_name():
    """open-r1's lighteval measurements first (its README at 1416fa0, lines 211-212 and
    545-617), DeepSeek's own harness beside them (the R1 report, Table 5)."""
    r1 = "/models/DeepSeek-R1-Distill-Qwen-7B"
    assert [published(r1, b) for b in ("aime24", "math500", "gpqa")] == [
        [(51.3, "open-r1 (lighteval)"), (55.5, "DeepSeek harness")],
        [(93.5, "open-r1 (lighteval)"), (92.8, "DeepSeek harness")],
        [(52.4, "open-r1 (lighteval)"), (49.1, "DeepSeek harness")]]
    assert published("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "aime24") == [
        (43.9, "open-r1 (lighteval)"), (50.4, "DeepSeek harness")]
    assert published("open-r1/OpenR1-Distill-7B", "gpqa") == [(52.8, "open-r1 (lighteval)")]
    assert published("my-student", "math500") == []
    assert published(r1, "gsm8k") == []


def _benchmark_oracle():
    """An OpenAI-compatible server that answers each benchmark prompt right: the boxed number
    for the math presets, "Answer: X" for GPQA (reading where the right choice was put)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        prompt = (await request.json())["messages"][-1]["content"]
        choice = re.search(r"^([ABCD])\) right", prompt, re.M)
        if choice:
            text = f"<think>\nweighing\n</think>\n\nAnswer: {choice.group(1)}"
        else:
            a, b = map(int, re.search(r"\$(\d+) \+ (\d+)\$", prompt).groups())
            text = f"<think>\n{a}+{b}\n</think>\n\nTherefore, the final answer is: $\\boxed{{{a + b}}}$."
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "oracle", "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models)])


def test_eval_benchmark_over_http_reads_the_answers(local, tmp_path, monkeypatch):
    from distill.serve.app import ServerThread

    monkeypatch.chdir(tmp_path)
    with ServerThread(_benchmark_oracle()) as url:
        for name in ("math500", "gpqa"):
            data = benchmark_config(name, f"{url}/v1", served_name="oracle",
                                    source=local[name])
            report = run_eval(None, ["protocol.n=2", "protocol.greedy=false"], progress=False,
                              data=data)
            [model] = report["models"]
            assert report["benchmark"] == name and model["pass@1"]["value"] == 1.0
            assert report["protocol"]["max_new_tokens"] == 32768
    assert (tmp_path / "students" / "eval" / "gpqa-oracle" / "eval.md").is_file()


def test_eval_benchmark_in_process_and_served_agree(local, tmp_path):
    """`distill eval --benchmark` with a MODEL path and with `distill serve`'s URL give the same
    samples (the same model at temperature 0), and the report sets the published number of a
    model of that name beside ours."""
    from distill.serve.app import ServerThread, build_app

    student = toy.qwen2_dir(tmp_path / "DeepSeek-R1-Distill-Qwen-7B")
    common = ["--source", local["math500"], "--limit", "2", "--quiet", "--set", "protocol.n=1",
              "--set", "protocol.max_new_tokens=6", "--set", "protocol.temperature=0"]
    local_run = invoke_cli(["eval", "--benchmark", "math500", "--model", str(student), *common],
                           cwd=tmp_path)
    assert local_run.returncode == 0, local_run.stderr
    assert ("| published pass@1 | 93.5% (open-r1 (lighteval)) · 92.8% (DeepSeek harness) |"
            in local_run.stdout)
    assert "answers read as open-r1 reads them" in local_run.stdout
    model, tok = distill.load_pretrained(student)
    with ServerThread(build_app(model, tok, "toy")) as url:
        served = invoke_cli(["eval", "--benchmark", "math500", "--model", f"{url}/v1", *common],
                            cwd=tmp_path)
    assert served.returncode == 0, served.stderr
    out = tmp_path / "students" / "eval"
    a = [json.loads(x) for x in (out / "math500-DeepSeek-R1-Distill-Qwen-7B" /
                                 "samples.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (out / "math500-toy" / "samples.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4  # 2 problems x (1 sample + greedy)
    # (the server sends an unclosed think block as reasoning_content, so only its text differs)
    fields = ("prompt_id", "greedy", "reference", "predicted", "correct", "tokens",
              "finish_reason")
    assert [[x[f] for f in fields] for x in a] == [[x[f] for f in fields] for x in b]
    assert [x["completion"].strip() for x in a] == [x["completion"].strip() for x in b]


def test_eval_benchmark_bad_input_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    student = toy.qwen2_dir(tmp_path / "student")
    # a process of its own: the hub libraries read HF_HOME and the offline flags when imported
    offline = run_cli(["eval", "--benchmark", "aime25", "--model", str(student), "--quiet"],
                      cwd=tmp_path)
    assert_user_error(offline, "cannot load hub dataset 'yentinglin/aime_2025' split 'train': "
                               "offline (HF_HUB_OFFLINE=1) and not in the local cache")
    unknown = invoke_cli(["eval", "--benchmark", "mmlu", "--model", str(student)], cwd=tmp_path)
    assert_user_error(unknown, "unknown benchmark 'mmlu'")
    (tmp_path / "eval.yaml").write_text("prompts: {source: synthetic}\nmodels: [{model: m}]\n")
    stray = invoke_cli(["eval", "eval.yaml", "--limit", "3"], cwd=tmp_path)
    assert stray.returncode == 2 and "--source and --limit go with --benchmark" in stray.stderr
    assert not (tmp_path / "students").exists()
