"""A few rows of each public reasoning dataset and benchmark, in its exact schema (column names,
Arrow types, nested lists and structs, file layout), written as the hub serves them. The schemas
are those of the dataset cards (dataset_info features) and of the code that built the datasets:

- open-r1/OpenR1-Math-220k (parquet): problem, solution, answer, problem_type, question_type,
  source, uuid: string; is_reasoning_complete: list<bool>; generations: list<string>;
  correctness_math_verify: list<bool>; correctness_llama: list<bool> (null entries);
  finish_reasons: list<string> (null entries); correctness_count: int64;
  messages: list<struct<content, role>>.
- open-r1/Mixture-of-Thoughts (parquet): messages: list<struct<content, role>>, num_tokens: int64,
  source: string.
- open-thoughts/OpenThoughts-114k, bespokelabs/Bespoke-Stratos-17k (parquet): system: string,
  conversations: list<struct<from, value>> with from "user" / "assistant" and the value
  "<|begin_of_thought|>\\n\\n{r}\\n\\n<|end_of_thought|>\\n\\n<|begin_of_solution|>\\n\\n{s}\\n\\n
  <|end_of_solution|>".
- open-thoughts/OpenThoughts3-1.2M (parquet): difficulty: int64, source, domain: string,
  conversations (from "human" / "gpt", the reasoning in <think>).
- simplescaling/s1K-1.1 (parquet): solution, question, cot_type, source_type, metadata,
  gemini_thinking_trajectory, gemini_attempt, deepseek_thinking_trajectory, deepseek_attempt,
  gemini_grade, gemini_grade_reason, deepseek_grade, deepseek_grade_reason: string ("Yes"/"No").
- a-m-team/AM-DeepSeek-R1-Distilled-1.4M (.jsonl.zst): messages [{role, content, info}], user
  info {source, reference_answer, test_case}, assistant info {source, think_content,
  answer_content}, content "<think>{think}</think>\\n<answer>{answer}</answer>".
- Benchmarks: HuggingFaceH4/MATH-500 (problem, solution, answer, subject: string, level: int64,
  unique_id: string), HuggingFaceH4/aime_2024 (id: int64, problem, solution, answer, url, year),
  yentinglin/aime_2025 (problem, answer), Idavidrein/gpqa gpqa_diamond (Question, Correct Answer,
  Incorrect Answer 1..3, Record ID, ...), openai/gsm8k main (question, answer ending "#### N").
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
SHAREGPT = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
S = pa.string()


def _write(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def think(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# --------------------------------------------------------------------------------------------
# Trace datasets

OPENR1_SCHEMA = pa.schema(
    [(c, S) for c in ("problem", "solution", "answer", "problem_type", "question_type", "source",
                      "uuid")]
    + [("is_reasoning_complete", pa.list_(pa.bool_())), ("generations", pa.list_(S)),
       ("correctness_math_verify", pa.list_(pa.bool_())),
       ("correctness_llama", pa.list_(pa.bool_())), ("finish_reasons", pa.list_(S)),
       ("correctness_count", pa.int64()), ("messages", MESSAGES)])


def openr1_row(i: int, gens: list[tuple[bool, str | None, bool]]) -> dict:
    """A problem with one generation per (math_verify verdict, finish reason, complete)."""
    a, b = 3 + i, 4 + 2 * i
    problem = f"Compute {a} + {b}."
    generations = [think(f"Attempt {g}: {a} + {b} = {a + b if ok else a + b + 1}.",
                         f"The sum is $\\boxed{{{a + b if ok else a + b + 1}}}$.")
                   for g, (ok, _, _) in enumerate(gens)]
    return {
        "problem": problem, "solution": f"{a} + {b} = {a + b}", "answer": str(a + b),
        "problem_type": "Algebra", "question_type": "math-word-problem", "source": "olympiads",
        "uuid": f"uuid-{i:04d}", "is_reasoning_complete": [c for _, _, c in gens],
        "generations": generations, "correctness_math_verify": [ok for ok, _, _ in gens],
        "correctness_llama": None, "finish_reasons": [r for _, r, _ in gens],
        "correctness_count": sum(ok for ok, _, _ in gens),
        "messages": [{"content": problem, "role": "user"},
                     {"content": generations[0], "role": "assistant"}]}


def openr1_math(path: Path, n: int = 6) -> Path:
    """n rows of four generations each: (right, stop), (right, length), (wrong, stop),
    (right, finish reason null but incomplete)."""
    gens = [(True, "stop", True), (True, "length", False), (False, "stop", True),
            (True, None, False)]
    return _write(path, [openr1_row(i, gens) for i in range(n)], OPENR1_SCHEMA)


MOT_SCHEMA = pa.schema([("messages", MESSAGES), ("num_tokens", pa.int64()), ("source", S)])


def mixture_of_thoughts(path: Path, n: int = 6) -> Path:
    """Single-turn math rows, plus one multi-turn conversation with a system prompt."""
    rows = []
    for i in range(n):
        q = f"What is {i} times 7?"
        rows.append({"messages": [{"content": q, "role": "user"},
                                  {"content": think(f"{i} * 7 = {7 * i}", f"\\boxed{{{7 * i}}}"),
                                   "role": "assistant"}],
                     "num_tokens": 40 + i, "source": "open-r1/OpenR1-Math-220k"})
    rows.append({"messages": [
        {"content": "You are a careful tutor.", "role": "system"},
        {"content": "What is 2 + 2?", "role": "user"},
        {"content": think("2 + 2 = 4", "It is 4."), "role": "assistant"},
        {"content": "And doubled?", "role": "user"},
        {"content": think("4 * 2 = 8", "Doubled, it is 8."), "role": "assistant"}],
        "num_tokens": 90, "source": "multi-turn"})
    return _write(path, rows, MOT_SCHEMA)


SYSTEM_SKY_T1 = ("Your role as an assistant involves thoroughly exploring questions through a "
                 "systematic long thinking process before providing the final precise and accurate "
                 "solutions.")


def marked(reasoning: str, solution: str) -> str:
    return (f"<|begin_of_thought|>\n\n{reasoning}\n\n<|end_of_thought|>\n\n"
            f"<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>")


def openthoughts(path: Path, n: int = 5) -> Path:
    """OpenThoughts-114k / Bespoke-Stratos-17k: system + ShareGPT conversations with markers."""
    rows = [{"system": SYSTEM_SKY_T1, "conversations": [
        {"from": "user", "value": f"Return your final response within \\boxed{{}}. What is {i} + 5?"},
        {"from": "assistant", "value": marked(f"{i} + 5 = {i + 5}", f"\\boxed{{{i + 5}}}")}]}
        for i in range(n)]
    return _write(path, rows, pa.schema([("system", S), ("conversations", SHAREGPT)]))


def openthoughts3(path: Path, n: int = 5) -> Path:
    """OpenThoughts3-1.2M: no system column, human / gpt, reasoning in <think>."""
    rows = [{"difficulty": 3 + i % 4, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
             "conversations": [
                 {"from": "human", "value": f"Find {i} squared."},
                 {"from": "gpt", "value": think(f"{i} * {i} = {i * i}", f"\\boxed{{{i * i}}}")}]}
            for i in range(n)]
    return _write(path, rows, pa.schema([("difficulty", pa.int64()), ("source", S),
                                         ("domain", S), ("conversations", SHAREGPT)]))


S1K_COLUMNS = ("solution", "question", "cot_type", "source_type", "metadata",
               "gemini_thinking_trajectory", "gemini_attempt", "deepseek_thinking_trajectory",
               "deepseek_attempt", "gemini_grade", "gemini_grade_reason", "deepseek_grade",
               "deepseek_grade_reason")


def s1k(path: Path, n: int = 5) -> Path:
    """s1K-1.1: every column a string; deepseek_grade "Yes" except for row 1."""
    rows = []
    for i in range(n):
        rows.append({
            "solution": str(10 * i), "question": f"What is {i} times 10?", "cot_type": "math",
            "source_type": "AI-MO/NuminaMath-CoT/aops_forum", "metadata": f"{{'id': {i}}}",
            "gemini_thinking_trajectory": f"{i}0", "gemini_attempt": f"{i}0",
            "deepseek_thinking_trajectory": f"Multiply: {i} * 10 = {10 * i}.",
            "deepseek_attempt": f"The answer is $\\boxed{{{10 * i}}}$.",
            "gemini_grade": "Yes", "gemini_grade_reason": "ok",
            "deepseek_grade": "No" if i == 1 else "Yes", "deepseek_grade_reason": "checked"})
    return _write(path, rows, pa.schema([(c, S) for c in S1K_COLUMNS]))


def am_distilled(path: Path, n: int = 5) -> Path:
    """AM-DeepSeek-R1-Distilled: zstd-compressed JSON lines, <think> then <answer> tags."""
    lines = []
    for i in range(n):
        thought, answer = f"Half of {2 * i} is {i}.\n", f"\nHalf of {2 * i} is \\boxed{{{i}}}.\n"
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"What is half of {2 * i}?",
             "info": {"source": "am-0309", "reference_answer": str(i), "test_case": None}},
            {"role": "assistant", "content": f"<think>{thought}</think>\n<answer>{answer}</answer>",
             "info": {"source": "am-0309", "think_content": thought, "answer_content": answer}}]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.output_stream(str(path), compression="zstd") as f:
        f.write(("\n".join(lines) + "\n").encode())
    return path


# --------------------------------------------------------------------------------------------
# Benchmarks

def math500(path: Path) -> Path:
    rows = [{"problem": f"What is ${a} + {b}$?", "solution": f"${a} + {b} = \\boxed{{{a + b}}}$",
             "answer": str(a + b), "subject": "Prealgebra", "level": 1 + i % 5,
             "unique_id": f"test/prealgebra/{100 + i}.json"}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8)])]
    return _write(path, rows, pa.schema([("problem", S), ("solution", S), ("answer", S),
                                         ("subject", S), ("level", pa.int64()),
                                         ("unique_id", S)]))


def aime24(path: Path) -> Path:
    rows = [{"id": 60 + i, "problem": f"Find the remainder when {10 + i} is divided by 7.",
             "solution": "...", "answer": str((10 + i) % 7),
             "url": f"https://artofproblemsolving.com/wiki/{i}", "year": "2024"} for i in range(3)]
    return _write(path, rows, pa.schema([("id", pa.int64()), ("problem", S), ("solution", S),
                                         ("answer", S), ("url", S), ("year", S)]))


def aime25(path: Path) -> Path:
    rows = [{"problem": f"Find {i} cubed.", "answer": str(i ** 3)} for i in range(2, 5)]
    return _write(path, rows, pa.schema([("problem", S), ("answer", S)]))


GPQA_COLUMNS = ("Pre-Revision Question", "Pre-Revision Correct Answer", "Question",
                "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                "Incorrect Answer 3", "Explanation", "Record ID", "Subdomain")


def gpqa(path: Path, n: int = 8) -> Path:
    rows = [{"Pre-Revision Question": "", "Pre-Revision Correct Answer": "",
             "Question": f"Which particle number {i} is right?", "Correct Answer": f"right {i}",
             "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b",
             "Incorrect Answer 3": f"wrong {i}c", "Explanation": "", "Record ID": f"rec{i:03d}",
             "Subdomain": "Physics (general)"} for i in range(n)]
    return _write(path, rows, pa.schema([(c, S) for c in GPQA_COLUMNS]))


def gsm8k(path: Path) -> Path:
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many does he have?",
             "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b:,}"}
            for a, b in [(3, 4), (1200, 34), (5, 5)]]
    return _write(path, rows, pa.schema([("question", S), ("answer", S)]))
