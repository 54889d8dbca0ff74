"""The `open-r1` answer reading: completions read as lighteval reads them at d3da6b9b, the commit
open-r1 1416fa0 pins (setup.py:59); GPQA laid out as there; the same reading over HTTP with a
reasoning parser as on the raw text.

Citations: `emu.py:N` is src/lighteval/metrics/utils/extractive_match_utils.py at d3da6b9b,
`prompts.py:N` src/lighteval/tasks/default_prompts.py, `pipeline.py:N` src/lighteval/pipeline.py.
The expected readings were also checked against that file itself, run on the same texts.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.data.benchmarks import BENCHMARKS, benchmark, lighteval_gpqa_position, load_benchmark
from distill.eval.evaluate import run_eval
from distill.extractive_match import judge_math, read_letter, read_math
from tests import public_datasets as pub

# (completion, the math value read (sympy's str) or None, the GPQA letter read or None, the rule)
READINGS = [
    # priority 0, "final answer is X. I hope" (emu.py:249, 142), before any \boxed{} (55)
    ("The sum is 12. Therefore, the final answer is: $\\boxed{15}$. I hope it is correct", "15",
     None, "emu.py:249"),
    ("Therefore, the final answer is: 15. I hope it is correct. Check: \\boxed{14}", "15", "C",
     "emu.py:142 over 277; the letter: any capital, emu.py:333"),
    # priority 50, "final answer ... is X" (emu.py:250)
    ("So the final answer for part (b) is $\\frac{2}{3}$, and 7 more", "2/3", None, "emu.py:250"),
    # priority 55, \boxed{} (emu.py:264-277): before "answer: X" (100); boxes joined by "," make
    # a set (emu.py:236-240, 478-487)
    ("We find \\boxed{6} and later the answer: 8", "6", None, "emu.py:277 over 150"),
    ("First \\boxed{3}, then correcting: \\boxed{4}", "{3, 4}", None, "emu.py:266-274, 478-487"),
    ("\\[ \\boxed{10} \\]", "10", None, "emu.py:212, 266"),
    ("Final answer: $\\boxed{\\dfrac{14}{3}}$", "14/3", None, "emu.py:274"),
    ("It is \\boxed{5", None, None, "emu.py:277 needs a closing brace; no anchored number"),
    # priority 100 / 200, "answer: X" / "answer ... X" (emu.py:150-151, 255-256)
    ("First answer: 5, then more text: 2+2", "5", None, "emu.py:150"),
    ("answer: $x = 2 + 1$", "Eq(x, 1 + 2)", None, "emu.py:255"),
    ("The answer is 7.", "7", None, "emu.py:151"),
    # priority 300, any LaTeX, expression or number, the rightmost first (emu.py:154-157, 561)
    ("I computed 12 then 15 and finally 18", "18", None, "emu.py:157, 561"),
    ("x = 2 + 3 = 5", "5", None, "emu.py:156-157, 561"),
    ("We get $\\frac{\\pi}{2}$ and $3$ or $4$", "{3, 4, pi/2}", None, "emu.py:236-240"),
    ("So the area is 25%", "25*(1/100)", None, "emu.py:114, 406-407"),
    ("He has 1,234 apples.\n#### 1,234", "1234", None, "emu.py:107, 395"),
    # truncated, no </think>: the whole text is read, its last number
    ("Okay so 3 + 4 = 7, and then times 2 gives 14. Hmm, wait", "14", None, "emu.py:157"),
    ("Alright, 3 + 4 = 7 and 7 \\cdot 2 = 14, so maybe 14. Let me double-check the", "14", "A",
     "emu.py:157; the letter: the capital A, emu.py:333"),
    # a closed think block: still the whole completion, the answer after it the rightmost
    ("Let me compute 2+3. That's 5. Maybe 6? No.\n</think>\n\nThe final answer is $\\boxed{5}$.",
     "5", None, "emu.py:250"),
    # letters (emu.py:283-337)
    ("Answer: C", None, "C", "emu.py:320"),
    ("B) looks wrong, C) too.\nAnswer: D", None, "D", "emu.py:320"),
    ("**Answer: B**", None, "B", "emu.py:320"),
    ("Answer: A\nWait, no. Answer: C", None, "C", "emu.py:320, 561: the rightmost"),
    ("The final answer is: D. I hope it is correct", None, "D", "emu.py:307"),
    ("**Final Answer:** B", None, "B", "emu.py:320"),
    ("After weighing it, the answer is clearly B, not A.", None, "B", "emu.py:322"),
    ("Thus the answer is (A).", None, "A", "emu.py:322 fails on '(', emu.py:333"),
    ("B. Because the energy is conserved.", None, "B", "emu.py:324"),
    ("Option B seems best, though A) is close.", None, "B", "emu.py:332"),
    ("Choice C has the right units; A and B do not", None, "B", "emu.py:332, 561"),
    ("Answer: E", None, "A", "E is no choice: the A of 'Answer', emu.py:333"),
    ("Answer: $C$", "c", "C", "emu.py:320; as math, the symbol c"),
    ("we eliminate the first and the last, leaving the Second option", None, None,
     "no capital A-D anywhere"),
]


@pytest.mark.parametrize("text, value, letter, rule", READINGS)
def test_completions_read_as_lighteval_reads_them(text, value, letter, rule):
    found = read_math(text)
    assert (None if found is None else str(found.value)) == value, rule
    assert read_letter(text) == letter, rule


@pytest.mark.parametrize("text, reference, correct", [
    ("Therefore, the final answer is: $\\boxed{\\frac{1}{2}}$. I hope it is correct", "0.5", True),
    ("so it is 0.5", "\\frac{1}{2}", True),  # False at the pin (see distill.extractive_match)
    ("Therefore, the final answer is: $\\boxed{033}$.", "33", True),
    ("First \\boxed{3}, then correcting: \\boxed{4}", "4", False),  # read as the set {3, 4}
    ("Okay so 3 + 4 = 7, and then times 2 gives 14. Hmm, wait", "14", True),  # truncated
    ("the answer is not clear to me", "7", False),
    ("answer: $x = 2 + 1$", "3", True),  # an equation against a number: its right side
    ("The answer is $\\left( 3, \\frac{\\pi}{2} \\right)$", "\\left( 3, \\frac{\\pi}{2} \\right)",
     True),
])
def test_open_r1_judgement(text, reference, correct):
    """math-verify's equality at 6 decimal places, the reference read as a \\boxed{} gold."""
    assert judge_math(text, reference)[1] is correct
    assert benchmark("math500").judge(text, reference, "open-r1")[1] is correct


def test_gpqa_judgement_reads_letters_down_to_any_capital():
    gpqa = benchmark("gpqa")
    assert gpqa.judge("Answer: E", "A", "open-r1") == ("A", True)  # lighteval's fallback
    assert gpqa.judge("Answer: E", "A", "strict") == (None, False)  # distill's anchored letter
    assert gpqa.judge("reasoning with A\n</think>\n\nAnswer: C", "C", "strict") == ("C", True)


# ------------------------------------------------------------------------------------------------
# GPQA's layout


def lighteval_gpqa_instruct(line: dict) -> tuple[str, int]:
    """`gpqa_instruct`, prompts.py:820-834 at d3da6b9b, transcribed: the query and gold index."""
    gold_index = random.randint(0, 3)
    choices = [line["Incorrect Answer 1"], line["Incorrect Answer 2"], line["Incorrect Answer 3"]]
    choices.insert(gold_index, line["Correct Answer"])
    query_template = "Answer the following multiple choice question. The last line of your response should be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering.\n\n{Question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"  # noqa: E501
    query = query_template.format(A=choices[0], B=choices[1], C=choices[2], D=choices[3],
                                  Question=line["Question"])
    return query, gold_index


def _gpqa_rows(n: int) -> list[dict]:
    """GPQA-Diamond rows in its schema, with its stray whitespace and LaTeX braces."""
    return [{c: "" for c in pub.GPQA_COLUMNS} | {
        "Question": f" Which particle {i} has spin $\\frac{{1}}{{2}}$ {{x}}? \n",
        "Correct Answer": f"right {i} \n", "Incorrect Answer 1": f"$\\mathrm{{A}}_{i}$",
        "Incorrect Answer 2": f"wrong {i}b", "Incorrect Answer 3": f" wrong {i}c",
        "Record ID": f"rec{i:03d}"} for i in range(n)]


def test_gpqa_prompts_for_the_first_20_questions_are_lightevals(tmp_path):
    """lighteval seeds Python's generator with 1234 before it builds the docs (pipeline.py:257-260)
    and calls the prompt function once per row in row order (lighteval_task.py:286-291)."""
    rows = _gpqa_rows(20)
    path = tmp_path / "gpqa.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string())
                                                                for c in pub.GPQA_COLUMNS])), path)
    state = random.getstate()
    try:
        random.seed(1234)
        expected = [lighteval_gpqa_instruct(row) for row in rows]
    finally:
        random.setstate(state)
    records = load_benchmark(BENCHMARKS["gpqa"], str(path), seed=7)  # open-r1: seed unused
    assert [(r.prompt, r.reference) for r in records] == [(q, "ABCD"[g]) for q, g in expected]
    assert [lighteval_gpqa_position(i) for i in range(20)] == [g for _, g in expected]
    assert [g for _, g in expected][:8] == [3, 0, 0, 0, 0, 0, 0, 2]  # not balanced, as there
    assert [r.id for r in records] == [f"rec{i:03d}" for i in range(20)]


# ------------------------------------------------------------------------------------------------
# The same reading whatever the backend


def _server(texts: dict[str, str]):
    """An OpenAI-compatible server: model "parser" answers as vLLM with a reasoning parser does
    for a think block that never closed (reasoning_content, content null), model "raw" the raw
    text (what the engine returns in process after a prompt that opened the think block)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        text = next(t for key, t in texts.items() if key in prompt)
        message = ({"role": "assistant", "content": None, "reasoning_content": text.strip()}
                   if body["model"] == "parser" else {"role": "assistant", "content": text})
        return JSONResponse({"choices": [{"message": message, "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 50}})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@pytest.mark.parametrize("reading", ["open-r1", "strict"])
def test_truncated_completion_reads_the_same_over_http_with_a_reasoning_parser(
        reading, tmp_path, monkeypatch):
    from distill.serve.app import ServerThread

    monkeypatch.chdir(tmp_path)
    source = str(pub.math500(tmp_path / "math500.parquet"))
    texts = {"1 + 2": "Okay, 1 + 2 = 3, so it is 3. Let me double-check the",  # truncated
             "3 + 4": "Adding, \\boxed{7}. Wait, let me verify that again",
             "5 + 6": "Hmm, 5 + 6 is 11, or is it 10? I get 10",
             "7 + 8": "Let me think about 7 and 8"}
    with ServerThread(_server(texts)) as url:
        data = {"name": "agree", "benchmark": {"name": "math500", "source": source},
                "models": [{"kind": "openai", "base_url": f"{url}/v1", "model": m, "name": m}
                           for m in ("parser", "raw")]}
        report = run_eval(None, ["protocol.n=1", "protocol.greedy=false",
                                 f"protocol.answer_reading={reading}"], progress=False, data=data)
    assert report["protocol"]["answer_reading"] == reading
    rows = [json.loads(x) for x in
            (tmp_path / "students" / "eval" / "agree" / "samples.jsonl").read_text().splitlines()]
    by_model = {m: [(r["predicted"], r["correct"], r["think_closed"]) for r in rows
                    if r["model"] == m] for m in ("parser", "raw")}
    assert by_model["parser"] == by_model["raw"]
    if reading == "open-r1":
        assert by_model["raw"] == [("3", True, False), ("7", True, False), ("10", False, False),
                                   ("8", False, False)]
    else:  # only a \boxed{} is read, from the whole text when no </think> closed a block
        assert by_model["raw"] == [(None, False, False), ("7", True, False),
                                   (None, False, False), (None, False, False)]


def test_reading_off_the_main_thread_is_the_same():
    """Off the main thread (no signal-based timeout there) ordinary answers read the same, and
    one sympy could stall on is not parsed rather than left to hang."""
    from concurrent.futures import ThreadPoolExecutor

    def read(text):
        found = read_math(text)
        return None if found is None else str(found.value)

    texts = [text for text, *_ in READINGS]
    with ThreadPoolExecutor(1) as pool:
        assert list(pool.map(read, texts)) == [value for _, value, *_ in READINGS]
        assert pool.submit(read, "so \\boxed{10^{10^{10^{10}}}}").result(timeout=30) is None
