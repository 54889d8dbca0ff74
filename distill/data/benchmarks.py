"""The standard reasoning benchmarks as prompt sets: where each one is, how a row becomes a prompt
and a reference, how the final answer is read, and the R1 evaluation protocol for it. They are
the registry `BENCHMARKS` (one `Benchmark` each: source, answer reading, n, token budget,
aliases); the eval config, `distill eval --benchmark` and `--decontaminate` take these names,
and the command line's help lists them, so this module imports only the standard library at
load (numpy, math-verify and the dataset readers where they are used).

Prompts are lighteval's at d3da6b9b, the commit open-r1 1416fa0 evaluates with (setup.py:59): the
math template for MATH-500 and AIME, the multiple-choice template for GPQA
(src/lighteval/tasks/default_prompts.py:56-71, 820-834, 1348-1363 there); sampling is R1's
(temperature 0.6, top-p 0.95, pass@1 averaged over n samples). GSM8K's prompt is not lighteval's
(open-r1 does not evaluate GSM8K): it is the question followed by DeepSeek-R1's recommended
instruction for math ("Please reason step by step, and put your final answer within \\boxed{}.").

Two answer readings (`READINGS`, the eval protocol's `answer_reading`):

- `open-r1` (the default for these presets): as open-r1 measures, lighteval's extractive match at
  that commit over the whole completion (`distill.extractive_match`), and GPQA laid out as there:
  the right answer at `random.randint(0, 3)` per question, drawn in row order after
  `random.seed(1234)` (pipeline.py:257-260), the three wrong ones in their column order, question
  and choices as the dataset has them;
- `strict`: distill's own, the last `\\boxed{}` (a choice letter after an anchor such as
  "Answer:") of the text after `</think>`, and GPQA's wrong choices shuffled with the protocol's
  seed and the right one's position balanced over the benchmark (each letter holds it for n/4
  questions, +-1), question and choices stripped; the order is a pure function of (seed, row).

Every source can be replaced by a local copy (`source:`: a Parquet / JSONL file or a save_to_disk
folder with the same columns); GPQA is gated on the hub (accept its terms, then HF_TOKEN).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.data.records import PromptRecord

# lighteval's MATH_QUERY_TEMPLATE (two spaces after "clearly." included)
MATH_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response "
    "should be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope "
    "it is correct' (without quotes) where ANSWER is just the final number or expression that "
    "solves the problem. Think step by step before answering.\n\n{prompt}")
GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of "
    "the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think "
    "step by step before answering.\n\n{prompt}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}")
# DeepSeek-R1's recommended math instruction (its model card), after the question
GSM8K_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."
LETTERS = "ABCD"
READINGS = ("open-r1", "strict")  # see the module docstring

# pass@1 (%) published for distilled students, to set beside ours, like-for-like first.
# "open-r1 (lighteval)": open-r1's own lighteval measurements in its README at 1416fa0 (vLLM,
# 32768 new tokens, n = 64 / 4 / 8): lines 211-212 for OpenR1-Distill-7B and R1-Distill-Qwen-7B
# (measured with the pinned lighteval), lines 545-552 / 577-584 / 610-617 for the other distills
# (2025-05-09, the lighteval before). "DeepSeek harness": the DeepSeek-R1 report, Table 5.
OPENR1, DEEPSEEK = "open-r1 (lighteval)", "DeepSeek harness"
_BENCHES = ("aime24", "math500", "gpqa")
_FIGURES = {  # model: {harness: (AIME 2024, MATH-500, GPQA-Diamond)}
    "openr1-distill-7b": {OPENR1: (52.7, 89.0, 52.8)},
    "deepseek-r1-distill-qwen-1.5b": {OPENR1: (30.7, 83.1, 35.8), DEEPSEEK: (28.9, 83.9, 33.8)},
    "deepseek-r1-distill-qwen-7b": {OPENR1: (51.3, 93.5, 52.4), DEEPSEEK: (55.5, 92.8, 49.1)},
    "deepseek-r1-distill-qwen-14b": {OPENR1: (65.9, 94.1, 61.5), DEEPSEEK: (69.7, 93.9, 59.1)},
    "deepseek-r1-distill-qwen-32b": {OPENR1: (69.7, 95.6, 63.1), DEEPSEEK: (72.6, 94.3, 62.1)},
    "deepseek-r1-distill-llama-8b": {OPENR1: (43.9, 88.6, 46.7), DEEPSEEK: (50.4, 89.1, 49.0)},
    "deepseek-r1-distill-llama-70b": {OPENR1: (63.0, 95.1, 67.4), DEEPSEEK: (70.0, 94.5, 65.2)},
}
PUBLISHED: dict[str, dict[str, list[tuple[float, str]]]] = {
    model: {b: [(v[i], harness) for harness, v in by.items()] for i, b in enumerate(_BENCHES)}
    for model, by in _FIGURES.items()}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: its hub source, the row -> (id, prompt, reference) rule, the answer reader
    and checker, and the R1 protocol defaults (n samples, token budget)."""

    name: str
    title: str
    source: str
    config: str | None
    split: str
    columns: tuple[str, ...]
    n: int  # samples per prompt
    max_new_tokens: int
    answer: str  # "boxed" | "letter" | "number": how `strict` reads a completion's final answer
    # (row, index, seed, reading) -> id, prompt, reference
    build: Callable[[dict, int, int, str], tuple[str, str, str]]
    aliases: tuple[str, ...] = ()  # other names it answers to (lower case, no "-" or "_")

    def judge(self, text: str, reference: str, reading: str) -> tuple[str | None, bool]:
        """(the answer read, whether it equals the reference) of a completion's text, as
        `reading` reads it: `open-r1` over the whole text, `strict` after `</think>`."""
        if reading == "strict":
            from distill.chat import split_think

            predicted = self.extract(split_think(text).answer)
            return predicted, self.matches(predicted, reference)
        from distill.extractive_match import judge_math, read_letter

        if self.answer == "letter":
            letter = read_letter(text, LETTERS)
            return letter, letter == reference
        return judge_math(text, reference)

    def extract(self, text: str) -> str | None:
        """The final answer of a completion's answer part, as `strict` reads it."""
        from distill.verify import extract_answer, extract_choice

        if self.answer == "letter":
            return extract_choice(text, LETTERS)
        boxed = extract_answer(text)
        if boxed is not None or self.answer == "boxed":
            return boxed
        return extract_answer(text, _GSM8K_ANSWER)

    def matches(self, predicted: str | None, reference: str) -> bool:
        """Whether a `strict` reading equals the reference."""
        from distill.verify import answers_match

        if predicted is None:
            return False
        if self.answer == "letter":
            return predicted == reference
        return answers_match(predicted, reference)


_GSM8K_ANSWER = r"####\s*\$?(-?[\d,]*\.?\d+)"


def gsm8k_reference(answer: str) -> str:
    """The number after GSM8K's "####", thousands separators removed."""
    if "####" not in answer:
        raise ValueError('no "#### N" in the answer')
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def _prompt_id(text) -> str:
    """`prompt_hash_id`, imported on use (see the module docstring)."""
    from distill.data.prompts import prompt_hash_id

    return prompt_hash_id(text)


def _math(problem: str, id_column: str | None = None):
    def build(row: dict, index: int, seed: int, reading: str) -> tuple[str, str, str]:
        text = row[problem]
        rid = str(row[id_column]) if id_column and row.get(id_column) is not None else None
        return rid or _prompt_id(text), MATH_TEMPLATE.replace("{prompt}", text), str(
            row["answer"]).strip()
    return build


def _gsm8k(row: dict, index: int, seed: int, reading: str) -> tuple[str, str, str]:
    text = row["question"]
    return (_prompt_id(text), GSM8K_TEMPLATE.replace("{prompt}", text),
            gsm8k_reference(row["answer"]))


def gpqa_position(index: int, seed: int) -> int:
    """Where question `index` puts its correct answer: a seeded permutation of 0,1,2,3,0,1,... over
    the benchmark, so every letter is right for a quarter of the questions. Blocks of four
    questions take the four positions in a seeded order; the result depends only on (seed, index)."""
    import numpy as np

    block, offset = divmod(index, 4)
    rng = np.random.default_rng([seed, block, 0x6770])
    return int(rng.permutation(4)[offset])


def lighteval_gpqa_position(index: int) -> int:
    """Where lighteval at open-r1's pin puts question `index`'s right answer (0-based): draw
    number index + 1 of `random.randint(0, 3)` after `random.seed(1234)` (pipeline.py:257-260;
    one draw per row, in row order, default_prompts.py:822)."""
    return _lighteval_positions(1024 * (index // 1024 + 1))[index]


@functools.lru_cache(maxsize=2)
def _lighteval_positions(count: int) -> tuple[int, ...]:
    rng = random.Random(1234)  # a generator of its own, seeded as lighteval seeds the global one
    return tuple(rng.randint(0, 3) for _ in range(count))


def _gpqa(row: dict, index: int, seed: int, reading: str) -> tuple[str, str, str]:
    right = row["Correct Answer"]
    wrong = [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
    if reading == "open-r1":  # gpqa_instruct, default_prompts.py:820-834: nothing stripped
        position = lighteval_gpqa_position(index)
        question, fields = row["Question"], lambda c: c
    else:
        import numpy as np

        key = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big")
        wrong = [wrong[j] for j in np.random.default_rng(key).permutation(3)]
        position = gpqa_position(index, seed)
        # stripped: GPQA's cells carry stray whitespace that could give the right one away
        question, fields = str(row["Question"]).strip(), lambda c: str(c).strip()
    choices = list(wrong)
    choices.insert(position, right)
    # one pass (values are never re-read: GPQA's LaTeX has braces such as \mathrm{C})
    prompt = GPQA_TEMPLATE.format(prompt=question, **{k: fields(c) for k, c in zip(
        LETTERS, choices, strict=True)})
    rid = row.get("Record ID") or _prompt_id(row["Question"])
    return str(rid), prompt, LETTERS[position]


# The registry: name, title, hub source (config, split), columns, R1's n and token budget, answer
# reading, row builder, aliases.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("math500", "MATH-500", "HuggingFaceH4/MATH-500", None, "test",
              ("problem", "answer"), 4, 32768, "boxed", _math("problem", "unique_id"),
              ("math",)),
    Benchmark("aime24", "AIME 2024", "HuggingFaceH4/aime_2024", None, "train",
              ("problem", "answer"), 64, 32768, "boxed", _math("problem", "id"), ("aime2024",)),
    Benchmark("aime25", "AIME 2025", "yentinglin/aime_2025", None, "train",
              ("problem", "answer"), 64, 32768, "boxed", _math("problem", "id"), ("aime2025",)),
    Benchmark("gpqa", "GPQA-Diamond", "Idavidrein/gpqa", "gpqa_diamond", "train",
              ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3"), 8, 32768, "letter", _gpqa, ("gpqadiamond", "gpqad")),
    Benchmark("gsm8k", "GSM8K", "openai/gsm8k", "main", "test", ("question", "answer"), 1, 32768,
              "number", _gsm8k),
)}


def benchmark(name: str) -> Benchmark:
    """The benchmark called `name` or one of its aliases (case, "-" and "_" ignored); a
    DistillError naming the benchmarks otherwise."""
    key = name.lower().replace("-", "").replace("_", "")
    for bench in BENCHMARKS.values():
        if key == bench.name or key in bench.aliases:
            return bench
    raise DistillError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")


def _open(bench: Benchmark, source: str | None):
    """The benchmark's rows, from `source` (a local copy) or the hub, its columns checked."""
    from distill.data.sources import open_source

    rows = open_source(source or bench.source, config=None if source else bench.config,
                       split=bench.split)
    missing = [c for c in bench.columns if c not in rows.columns]
    if missing:
        raise DistillError(f"{rows.where}: not {bench.title} (no column {missing[0]!r}; columns: "
                           f"{', '.join(rows.columns)})")
    return rows


def load_benchmark(bench: Benchmark, source: str | None = None, seed: int = 0,
                   limit: int | None = None, reading: str = "open-r1") -> list[PromptRecord]:
    """The benchmark's prompts with their references, from `source` (a local copy) or the hub,
    laid out for `reading` (GPQA's choices: see the module docstring)."""
    from distill.data.records import PromptRecord

    rows = _open(bench, source)
    records, seen = [], set()
    for index, (where, row) in enumerate(rows.rows()):
        if limit is not None and index >= limit:
            break
        try:
            rid, prompt, reference = bench.build(row, index, seed, reading)
        except (KeyError, TypeError, ValueError) as e:
            raise DistillError(f"{where}: not a {bench.title} row ({e})") from None
        if rid in seen:
            rid = f"{rid}-{index}"
        seen.add(rid)
        records.append(PromptRecord(rid, prompt, reference, {"benchmark": bench.name}))
    return records


def benchmark_prompts(bench: Benchmark, source: str | None = None) -> list[str]:
    """The benchmark's problem texts (without the template): what decontamination compares."""
    return [str(row[bench.columns[0]]) for _, row in _open(bench, source).rows()]


def published(model: str, bench: str) -> list[tuple[float, str]]:
    """The published pass@1 figures (%) for a model name (its last path part) on `bench`, each
    with the harness that measured it, open-r1's lighteval first; [] when there are none."""
    key = re.sub(r"[^a-z0-9.]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    return PUBLISHED.get(key, {}).get(bench, [])
