"""A built-in synthetic reasoning task: multi-step arithmetic chains with exact answers.

Each problem is a chain that starts at a number 2-9 and applies 2-4 operations, left to right:
`+ k` or `- k` (k in 1-9) or `* k` (k in 2-3). A subtraction that would go below zero becomes an
addition of the same k, so every intermediate value is a non-negative integer. The answer needs
every step, which is what makes step-by-step reasoning traces matter: a tiny model learns a 3-step
chain from worked solutions far better than from answers alone (the demo relies on this family).

Problems are seeded per (seed, index): the same seed gives the same problems, and problem i does
not depend on n, so a larger n extends the list. Both styles draw the same chain for the same
(seed, index), so they differ only in wording.

Formats, for the chain 7, +3, *2, -5 (answer 15):

- style="words": question "Mia has 7 marbles. She gets 3 more, then doubles her marbles, then
  gives away 5. How many marbles does she have now?"; steps "7 + 3 = 10", "10 * 2 = 20",
  "20 - 5 = 15"; final answer "The answer is \\boxed{15}." Names, objects and verbs come from
  small fixed lists; "* 2" / "* 3" are always "doubles" / "triples".
- style="compact" (for character-level tiny models): question "7 +3 *2 -5" (applied left to right,
  no operator precedence); steps "7+3=10", "10*2=20", "20-5=15"; final answer "\\boxed{15}".
  Question, steps and answer joined by newlines are about 40 characters for three steps.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Literal

from distill.errors import DistillError

# DeepSeek-R1's recommended instruction for math prompts.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

Style = Literal["words", "compact"]

_NAMES = (("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"),
          ("Sam", "he", "his"), ("Zoe", "she", "her"), ("Max", "he", "his"),
          ("Ivy", "she", "her"), ("Tom", "he", "his"))
_OBJECTS = ("marbles", "apples", "stickers", "coins", "books", "pencils", "cards", "shells")
_ADD = ("gets {k} more", "finds {k} more", "buys {k} more", "is given {k} more")
_SUB = ("gives away {k}", "loses {k}", "sells {k}", "gives {k} to a friend")
_MUL = {2: "doubles {poss} {obj}", 3: "triples {poss} {obj}"}

# One worked step, in either style: "7 + 3 = 10" or "7+3=10".
_STEP = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One arithmetic chain problem.

    `steps` are the worked steps in order ("7 + 3 = 10"), `answer` is the final value as an integer
    string, `difficulty` is the number of steps, `style` the wording ("words" or "compact").
    """

    id: str
    question: str
    steps: tuple[str, ...]
    answer: str
    difficulty: int
    style: Style = "words"


def arithmetic_problems(n: int, *, seed: int = 0, min_steps: int = 2, max_steps: int = 4,
                        style: Style = "words") -> list[Problem]:
    """`n` seeded chain problems with `min_steps`..`max_steps` steps each (see the module doc)."""
    if n < 0:
        raise DistillError(f"synthetic problems: n must be >= 0 (got {n})")
    if not 1 <= min_steps <= max_steps:
        raise DistillError(f"synthetic problems: need 1 <= min_steps <= max_steps "
                           f"(got min_steps={min_steps}, max_steps={max_steps})")
    if style not in ("words", "compact"):
        raise DistillError(f"synthetic problems: style must be 'words' or 'compact' (got {style!r})")
    return [_problem(seed, i, min_steps, max_steps, style) for i in range(n)]


def _problem(seed: int, index: int, min_steps: int, max_steps: int, style: Style) -> Problem:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and platforms.
    rng = random.Random(f"arith:{seed}:{index}")
    start, ops = _chain(rng, rng.randint(min_steps, max_steps))
    values = _values(start, ops)
    step = "{}{}{}={}" if style == "compact" else "{} {} {} = {}"
    steps = tuple(step.format(values[i], op, k, values[i + 1]) for i, (op, k) in enumerate(ops))
    if style == "compact":
        question = " ".join([str(start)] + [f"{op}{k}" for op, k in ops])
    else:  # wording is drawn after the chain, so both styles share the chain
        question = _words(rng, start, ops)
    return Problem(id=f"arith-{seed}-{index}", question=question, steps=steps,
                   answer=str(values[-1]), difficulty=len(ops), style=style)


def _chain(rng: random.Random, n_steps: int) -> tuple[int, list[tuple[str, int]]]:
    """A start value and `n_steps` (op, operand) pairs that keep every value >= 0."""
    start = value = rng.randint(2, 9)
    ops = []
    for _ in range(n_steps):
        op = rng.choice("+-*")
        k = rng.randint(2, 3) if op == "*" else rng.randint(1, 9)
        if op == "-" and k > value:
            op = "+"
        ops.append((op, k))
        value = _apply(value, op, k)
    return start, ops


def _apply(value: int, op: str, k: int) -> int:
    return value + k if op == "+" else value - k if op == "-" else value * k


def _values(start: int, ops: list[tuple[str, int]]) -> list[int]:
    """The chain's values: start, then the value after each step."""
    values = [start]
    for op, k in ops:
        values.append(_apply(values[-1], op, k))
    return values


def _words(rng: random.Random, start: int, ops: list[tuple[str, int]]) -> str:
    name, subj, poss = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    phrases = []
    for op, k in ops:
        if op == "*":
            phrases.append(_MUL[k].format(poss=poss, obj=obj))
        else:
            phrases.append(rng.choice(_ADD if op == "+" else _SUB).format(k=k))
    actions = ", then ".join(phrases)
    return (f"{name} has {start} {obj}. {subj.capitalize()} {actions}. "
            f"How many {obj} does {subj} have now?")


def solution_reasoning(problem: Problem) -> str:
    """The worked steps joined by newlines: what goes inside `<think>`."""
    return "\n".join(problem.steps)


def final_answer(problem: Problem) -> str:
    """The final answer text: "The answer is \\boxed{15}." (words) or "\\boxed{15}" (compact)."""
    boxed = f"\\boxed{{{problem.answer}}}"
    return boxed if problem.style == "compact" else f"The answer is {boxed}."


def evaluate_steps(steps: tuple[str, ...] | list[str]) -> int:
    """Re-evaluate worked steps, checking each one's arithmetic and that each starts from the
    previous result; returns the last result. Raises ValueError on a malformed or wrong step."""
    previous = None
    for step in steps:
        m = _STEP.match(step)
        if m is None:
            raise ValueError(f"malformed step {step!r}")
        a, op, k, b = int(m[1]), m[2], int(m[3]), int(m[4])
        if previous is not None and a != previous:
            raise ValueError(f"step {step!r} does not start from the previous result {previous}")
        if _apply(a, op, k) != b:
            raise ValueError(f"step {step!r} is wrong")
        previous = b
    if previous is None:
        raise ValueError("no steps")
    return previous


def check(problem: Problem) -> bool:
    """True when the steps are sound, their count is the difficulty and they end at the answer
    (for compact problems the question's chain is re-evaluated too)."""
    try:
        result = evaluate_steps(problem.steps)
    except ValueError:
        return False
    if problem.style == "compact" and _eval_compact(problem.question) != result:
        return False
    return len(problem.steps) == problem.difficulty and str(result) == problem.answer


def _eval_compact(question: str) -> int | None:
    """The value of a compact question "7 +3 *2 -5", left to right; None when malformed."""
    start, *ops = question.split()
    if not start.isdigit() or not all(len(t) > 1 and t[0] in "+-*" and t[1:].isdigit()
                                       for t in ops):
        return None
    return _values(int(start), [(t[0], int(t[1:])) for t in ops])[-1]
