"""The public reasoning-trace schemas, read as the same trace turns whatever the dataset.

A preset turns one dataset row into the traces it holds (`Turn`s): the conversation before a reply
(system prompt kept unless dropped, earlier assistant replies as their answers only, which is what
an R1-style client sends back), the reply's reasoning and answer, the dataset's own verdict and
finish reason. The presets are the registry `PRESETS` (each function's docstring says what it
reads); the config's `preset` values (`SchemaName`) and the command line's `--preset` choices come
from it, with "auto" (told from the columns) and "distill" (our own store).

Multi-turn conversations give one turn per assistant reply, each with its history, so every reply
is trained on exactly as the chat template renders that conversation at inference. A row with no
usable reply gives no turn; a row whose columns have the wrong types is an error naming the row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Literal

from distill.chat import THINK_CLOSE, THINK_OPEN, split_think
from distill.config import Frozen
from distill.data.prompts import prompt_hash_id
from distill.errors import DistillError

# our own store's columns (read by distill.data.traces directly, top-k arrays included)
TRACE_COLUMNS = ("id", "prompt_id", "prompt", "messages", "reasoning", "answer", "correct",
                 "finish_reason")


class ReasoningColumns(Frozen):
    """The `columns` preset's columns (defaults: s1K-1.1's DeepSeek-R1 traces). `correct`: a
    verdict column (true/false, or "Yes"/"No"); `reference`: a reference answer column."""

    prompt: str = "question"
    reasoning: str = "deepseek_thinking_trajectory"
    answer: str = "deepseek_attempt"
    correct: str | None = "deepseek_grade"
    reference: str | None = None


@dataclasses.dataclass(frozen=True)
class Turn:
    """One trace a dataset row holds: `index` numbers the traces of a row (a generation, or an
    assistant reply) and `messages` is the conversation before the reply."""

    prompt_id: str
    index: int
    messages: list[dict]
    reasoning: str
    answer: str
    reference: str | None
    correct: bool | None  # the dataset's own verdict, None when it has none
    finish_reason: str  # "stop" | "length" (a reply whose think block never closed)
    completion_tokens: int | None = None  # when the dataset counts them


class RowError(Exception):
    """Why one row cannot be read by its preset (the caller adds where it is)."""


@dataclasses.dataclass(frozen=True)
class Preset:
    """A schema: the columns that identify it and that it needs, how a row becomes turns, and
    which column carries the dataset's verdicts (then training keeps the correct ones by default)."""

    name: str
    needs: tuple[str, ...]
    turns: Callable[..., list[Turn]]
    verdicts: str | None  # the column holding the dataset's verdicts, if any
    datasets: str  # the public datasets it reads (the command line's help names them)


def detect_schema(columns: tuple[str, ...], where: str) -> str:
    """The preset whose identifying columns the dataset has, or a one-line error naming the
    columns found and the presets."""
    names = set(columns)
    if set(TRACE_COLUMNS) <= names:
        return "distill"
    for preset in PRESETS.values():
        if set(preset.needs) <= names:
            return preset.name
    known = "; ".join(f"{p.name} ({', '.join(p.needs)})" for p in PRESETS.values())
    raise DistillError(f"{where}: unknown trace schema (columns: {', '.join(columns) or 'none'}); "
                       f"known: distill (our store), {known}; set preset: to one of them")


def check_columns(preset: Preset, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in preset.needs if c not in columns]
    if missing:
        raise DistillError(f"{where}: schema {preset.name} needs column {missing[0]!r} "
                           f"(columns: {', '.join(columns) or 'none'})")


# ---------------------------------------------------------------------------------------------
# Replies and conversations

_THOUGHT = re.compile(r"<\|begin_of_thought\|>(.*?)(?:<\|end_of_thought\|>|$)(.*)", re.S)
_SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)
_ANSWER_TAGS = re.compile(r"^\s*<answer>(.*?)(?:</answer>\s*)?$", re.S)


def split_reply(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, complete) of an assistant reply: `<think>` blocks, OpenThoughts'
    thought / solution markers and `<answer>` tags understood; a reply without any reasoning
    markup is all answer. `complete` is False when a think or thought block never closes."""
    thought = _THOUGHT.search(text)
    if thought is not None:
        reasoning, rest = thought.group(1), thought.group(2)
        solution = _SOLUTION.search(rest)
        answer = solution.group(1) if solution else rest
        return reasoning.strip(), answer.strip(), "<|end_of_thought|>" in text
    split = split_think(text)
    if split.reasoning is None:
        return "", _unwrap_answer(split.answer), True
    return split.reasoning, _unwrap_answer(split.answer), split.closed


def _unwrap_answer(answer: str) -> str:
    m = _ANSWER_TAGS.match(answer)
    return m.group(1).strip() if m else answer


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what} is not text (got {type(value).__name__})")
    return value


def conversation_turns(messages: list[dict], *, drop_system: bool,
                       prompt_id: str | None = None) -> list[Turn]:
    """One turn per assistant reply of a [{role, content}] conversation (see the module doc).
    The prompt id is the first user message's hash unless given; a user message's
    `info.reference_answer` (AM) is the reference of the replies to it."""
    history, turns, reference = [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RowError(f"message {i} is not a {{role, content}} object")
        role, content = m["role"], _text(m.get("content"), f"message {i}'s content")
        if role == "assistant":
            if not any(h["role"] == "user" for h in history):
                continue  # a reply to nothing (a greeting before the first user turn)
            reasoning, answer, complete = split_reply(content)
            if prompt_id is None:
                prompt_id = prompt_hash_id(next(h["content"] for h in history
                                                if h["role"] == "user"))
            turns.append(Turn(prompt_id, len(turns), [dict(h) for h in history], reasoning,
                              answer, reference, None, "stop" if complete else "length"))
            history.append({"role": "assistant", "content": answer})
        elif role == "system":
            if not drop_system and content.strip():
                history.append({"role": "system", "content": content})
        else:
            history.append({"role": role, "content": content})
            if role == "user":  # each question has its own reference, or none
                info = m.get("info")
                reference = (str(info["reference_answer"]) if isinstance(info, dict) and
                             info.get("reference_answer") not in (None, "") else None)
    return turns


def _list(row: dict, column: str) -> list:
    value = row.get(column)
    if not isinstance(value, list):
        raise RowError(f"column {column!r} is not a list (got {type(value).__name__})")
    return value


# ---------------------------------------------------------------------------------------------
# The presets


def _messages(row: dict, drop_system: bool, columns: ReasoningColumns) -> list[Turn]:
    """`messages: [{role, content}]`, the reasoning inside `<think>…</think>` in assistant
    contents: open-r1/Mixture-of-Thoughts; also a-m-team/AM-DeepSeek-R1-Distilled-1.4M, whose
    assistant answers sit in `<answer>…</answer>` (unwrapped) and whose user turns carry
    `info.reference_answer` (the reference)."""
    return conversation_turns(_list(row, "messages"), drop_system=drop_system)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _sharegpt(row: dict, drop_system: bool, columns: ReasoningColumns) -> list[Turn]:
    """`system`, `conversations: [{from, value}]`, the reply marked `<|begin_of_thought|>…
    <|end_of_thought|>` then `<|begin_of_solution|>…<|end_of_solution|>` (or `<think>`):
    OpenThoughts-114k, OpenThoughts3-1.2M, Bespoke-Stratos-17k."""
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(_list(row, "conversations")):
        if not isinstance(m, dict) or m.get("from") not in _SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}] has no known 'from' "
                           f"(got {m.get('from') if isinstance(m, dict) else m!r})")
        messages.append({"role": _SHAREGPT_ROLES[m["from"]],
                         "content": _text(m.get("value"), f"conversations[{i}].value")})
    return conversation_turns(messages, drop_system=drop_system)


def _verdict(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().casefold()
    if text in ("yes", "true", "correct", "1"):
        return True
    if text in ("no", "false", "incorrect", "0"):
        return False
    return None


def _joined(value):
    return "\n".join(map(str, value)) if isinstance(value, list) else value


def _columns(row: dict, drop_system: bool, columns: ReasoningColumns) -> list[Turn]:
    """Prompt, reasoning and answer in their own columns (defaults: simplescaling/s1K-1.1's
    question, deepseek_thinking_trajectory, deepseek_attempt, verdict deepseek_grade)."""
    prompt = _text(row.get(columns.prompt), f"column {columns.prompt!r}")
    # (s1K-1.1 stored these as lists of strings at one revision)
    reasoning, answer = (_joined(row.get(c)) for c in (columns.reasoning, columns.answer))
    if reasoning is None and answer is None:
        return []  # a row without this model's trace (s1K-1.1 has a few)
    reasoning = _text(reasoning or "", f"column {columns.reasoning!r}").strip()
    reasoning = reasoning.removeprefix(THINK_OPEN).removesuffix(THINK_CLOSE).strip()
    reference = row.get(columns.reference) if columns.reference else None
    correct = _verdict(row.get(columns.correct)) if columns.correct else None
    return [Turn(prompt_hash_id(prompt), 0, [{"role": "user", "content": prompt}], reasoning,
                 _text(answer or "", f"column {columns.answer!r}").strip(),
                 None if reference in (None, "") else str(reference), correct, "stop")]


def _openr1_math(row: dict, drop_system: bool, columns: ReasoningColumns) -> list[Turn]:
    """open-r1/OpenR1-Math-220k: `problem`, `answer` (the reference), and per R1 generation the
    lists `generations`, `correctness_math_verify`, `correctness_llama` (the Llama judge the card
    describes for the ~12% math-verify could not parse; null where it did not judge) and
    `finish_reasons` (`is_reasoning_complete` where a finish reason is null): each generation is
    a turn, correct when either check says so, with its finish reason."""
    problem = _text(row.get("problem"), "column 'problem'")
    generations = _list(row, "generations")
    verdicts = _list(row, "correctness_math_verify")
    judge = row.get("correctness_llama")  # the Llama-3.3-70B judge, where math-verify failed
    reasons = row.get("finish_reasons")
    complete = row.get("is_reasoning_complete")
    if len(verdicts) != len(generations):
        raise RowError(f"{len(generations)} generations but {len(verdicts)} "
                       "correctness_math_verify entries")
    prompt_id = prompt_hash_id(problem)  # as every prompt source ids a problem text
    reference = row.get("answer")
    turns = []
    for i, text in enumerate(generations):
        reasoning, answer, closed = split_reply(_text(text, f"generations[{i}]"))
        reason = reasons[i] if isinstance(reasons, list) and i < len(reasons) else None
        if reason is None:
            done = complete[i] if isinstance(complete, list) and i < len(complete) else closed
            reason = "stop" if done else "length"
        verdict = verdicts[i] is True or (isinstance(judge, list) and i < len(judge)
                                          and judge[i] is True)
        turns.append(Turn(prompt_id, i, [{"role": "user", "content": problem}], reasoning, answer,
                          None if reference in (None, "") else str(reference), verdict,
                          str(reason)))
    return turns


# The registry, in the order `auto` tries them (the first whose columns a dataset has).
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("openr1_math", ("problem", "generations", "correctness_math_verify"), _openr1_math,
           "correctness_math_verify", "OpenR1-Math-220k"),
    Preset("sharegpt", ("conversations",), _sharegpt, None, "OpenThoughts, Bespoke-Stratos"),
    Preset("messages", ("messages",), _messages, None, "Mixture-of-Thoughts, AM"),
    Preset("columns", ("question", "deepseek_thinking_trajectory", "deepseek_attempt"), _columns,
           "deepseek_grade", "s1K-1.1"),
)}
SCHEMAS: tuple[str, ...] = ("distill", *PRESETS)  # what `preset` names besides "auto"
SchemaName = Literal[("auto", *SCHEMAS)]  # type: ignore[valid-type]


def preset_help() -> str:
    """The command line's `--preset` help, from the registry."""
    each = ", ".join(f"{p.name} ({p.datasets})" for p in PRESETS.values())
    return f"The schema: {each}, distill (our store); auto tells it from the columns."


def preset(name: str, columns: ReasoningColumns | None = None) -> Preset:
    """The preset called `name`; the `columns` preset needs the columns it is configured with."""
    if name not in PRESETS:
        raise DistillError(f"unknown trace schema {name!r} (known: {', '.join(SCHEMAS)})")
    p = PRESETS[name]
    if name == "columns" and columns is not None:
        needs = (columns.prompt, columns.reasoning, columns.answer)
        p = dataclasses.replace(p, needs=needs, verdicts=columns.correct)
    return p
