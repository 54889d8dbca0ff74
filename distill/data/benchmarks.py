"""The standard reasoning benchmarks as prompt sets: where each one is, how a row becomes a prompt
and a reference, how the final answer is read, and the R1 evaluation protocol for it. They are
the registry `BENCHMARKS` (one `Benchmark` each: source, answer reading, n, token budget,
aliases); the eval config, `distill eval --benchmark` and `--decontaminate` take these names,
and the command line's help lists them, so this module imports only the standard library at
load (numpy, math-verify and the dataset readers where they are used).

Prompts are lighteval's at the commit open-r1 evaluates with (the math template for MATH-500 and
AIME, the multiple-choice template for GPQA, its question and choices stripped as lighteval's
later versions do), so pass@1 is comparable with the published tables;
sampling is R1's (temperature 0.6, top-p 0.95, pass@1 averaged over n samples). GPQA's four
choices are shuffled with a seed: the correct answer's position is balanced over the benchmark
(each letter holds it for n/4 questions, +-1) and the order is a pure function of (seed, row).

Every source can be replaced by a local copy (`source:`: a Parquet / JSONL file or a save_to_disk
folder with the same columns); GPQA is gated on the hub (accept its terms, then HF_TOKEN).
"""

from __future__ import annotations

import dataclasses
import hashlib
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
GSM8K_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."
LETTERS = "ABCD"

# pass@1 (%) published for distilled students, to set beside ours: the DeepSeek-R1 report
# (Table 5) and open-r1's OpenR1-Distill-7B model card (lighteval + vLLM, 32768 new tokens).
PUBLISHED: dict[str, dict[str, tuple[float, str]]] = {
    "deepseek-r1-distill-qwen-7b": {"aime24": (55.5, "DeepSeek-R1 report"),
                                    "math500": (92.8, "DeepSeek-R1 report"),
                                    "gpqa": (49.1, "DeepSeek-R1 report")},
    "openr1-distill-7b": {"aime24": (52.7, "open-r1"), "math500": (89.0, "open-r1"),
                          "gpqa": (52.8, "open-r1")},
}


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
    answer: str  # "boxed" | "letter" | "number": how a completion's final answer is read
    build: Callable[[dict, int, int], tuple[str, str, str]]  # (row, index, seed) -> id, prompt, ref
    aliases: tuple[str, ...] = ()  # other names it answers to (lower case, no "-" or "_")

    def extract(self, text: str) -> str | None:
        """The final answer of a completion's answer part, as this benchmark reads it."""
        from distill.verify import extract_answer, extract_choice

        if self.answer == "letter":
            return extract_choice(text, LETTERS)
        boxed = extract_answer(text)
        if boxed is not None or self.answer == "boxed":
            return boxed
        return extract_answer(text, _GSM8K_ANSWER)

    def matches(self, predicted: str | None, reference: str) -> bool:
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
    def build(row: dict, index: int, seed: int) -> tuple[str, str, str]:
        text = row[problem]
        rid = str(row[id_column]) if id_column and row.get(id_column) is not None else None
        return rid or _prompt_id(text), MATH_TEMPLATE.replace("{prompt}", text), str(
            row["answer"]).strip()
    return build


def _gsm8k(row: dict, index: int, seed: int) -> tuple[str, str, str]:
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


def _gpqa(row: dict, index: int, seed: int) -> tuple[str, str, str]:
    import numpy as np

    right = row["Correct Answer"]
    wrong = [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
    key = int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big")
    order = list(np.random.default_rng(key).permutation(3))
    choices = [wrong[j] for j in order]
    position = gpqa_position(index, seed)
    choices.insert(position, right)
    # one pass (values are never re-read: GPQA's LaTeX has braces such as \mathrm{C}), fields
    # stripped (GPQA's cells carry stray whitespace that could give the right one away)
    prompt = GPQA_TEMPLATE.format(prompt=str(row["Question"]).strip(),
                                  **{k: str(c).strip() for k, c in zip(LETTERS, choices,
                                                                       strict=True)})
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
                   limit: int | None = None) -> list[PromptRecord]:
    """The benchmark's prompts with their references, from `source` (a local copy) or the hub."""
    from distill.data.records import PromptRecord

    rows = _open(bench, source)
    records, seen = [], set()
    for index, (where, row) in enumerate(rows.rows()):
        if limit is not None and index >= limit:
            break
        try:
            rid, prompt, reference = bench.build(row, index, seed)
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


def published(model: str, bench: str) -> tuple[float, str] | None:
    """The published pass@1 (%) and its source for a model name (its last path part), if any."""
    key = re.sub(r"[^a-z0-9.]+", "-", model.rsplit("/", 1)[-1].lower()).strip("-")
    return PUBLISHED.get(key, {}).get(bench)
