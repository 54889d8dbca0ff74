"""Which teacher samples become traces: the R1-style rejection-sampling filters.

`Judge.judge` applies the checks below in this order and returns the first that fails as the
verdict's `reason` (None = accepted); `Judge.counts` counts every verdict by reason, plus
"accepted".

1. `contaminated`  — the prompt shares a word n-gram (`decontam_ngram`, 8) with an evaluation prompt
                     from one of the `decontaminate` files.
2. `truncated`     — (`reject_truncated`, or keep "complete") the teacher stopped at its token
                     limit (finish_reason "length").
3. `no_think`      — (`require_think`) the completion has neither `<think>` nor `</think>`;
   `unclosed_think` — it opened a think block and never closed it.
4. `too_long`      — more than `max_completion_tokens` completion tokens.
5. `empty_answer`  — nothing after `</think>`.
6. `language_mix`  — more than `max_foreign_script` of the reasoning's letters are not in its
                     dominant script (Latin, CJK, Cyrillic, ...).
7. `no_answer`     — (keep "correct", a reference exists) no final answer could be extracted.
8. `wrong`         — (keep "correct") the final answer does not match the reference.
9. `duplicate`     — the same text (whitespace aside) as an accepted sample of the same prompt;
   `near_duplicate` — (dedup "near") word 5-gram Jaccard similarity >= `near_dup_threshold` with an
                     accepted sample of the same prompt.

The final answer (`predicted`) is extracted from the answer part only (after `</think>`; the whole
completion when there is no think block): the last `\\boxed{}` there, else `answer_pattern`'s last
match. An answer that only appears inside the reasoning is not the teacher's answer.

Deduplication is per prompt: two prompts may legitimately share a completion ("No solution."), and
a duplicate within one prompt is what adds nothing to training.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from distill.chat import split_think
from distill.config import Frozen, InputPath
from distill.data.records import PromptRecord, Sample
from distill.data.sources import open_source
from distill.data.traces import Keep
from distill.errors import DistillError
from distill.verify import AnswerPattern, answers_match, extract_answer

ACCEPTED = "accepted"
_SHINGLE = 5  # words per shingle for near-duplicate detection
# Prompts whose near-duplicate state is kept (least recently seen dropped first): samples of one
# prompt arrive close together, and each prompt holds its accepted samples' shingle sets.
_MAX_DEDUP_PROMPTS = 1024


class FiltersConfig(Frozen):
    """Answer checking and the rejection filters of `distill generate` (see the module docstring
    for the order and the reasons)."""

    # the readers' vocabulary (`distill.data.traces.Keep`): "correct" rejects wrong answers;
    # "complete" keeps them (with correct=False) and rejects truncated samples; "all" keeps them
    keep: Keep = "correct"
    answer_pattern: AnswerPattern = None  # regex with one group, used when there is no \boxed{}
    reject_truncated: bool = True
    require_think: bool = True
    reject_empty_answer: bool = True
    max_foreign_script: float | None = Field(0.05, ge=0.0, le=1.0)  # None: no language check
    max_completion_tokens: int | None = Field(None, gt=0)
    dedup: Literal["none", "exact", "near"] = "near"
    near_dup_threshold: float = Field(0.9, gt=0.0, le=1.0)
    decontaminate: tuple[InputPath, ...] = ()  # evaluation prompt files (.jsonl or .txt); a list
    decontam_ngram: int = Field(8, gt=0)



@dataclass
class Verdict:
    """The outcome for one sample: `reason` None when accepted; the reasoning and answer parts;
    the extracted final answer; whether it matches the reference (None without a reference)."""

    reason: str | None
    reasoning: str | None
    answer: str
    predicted: str | None
    correct: bool | None


# ------------------------------------------------------------------------------------------------
# Text helpers

def _words(text: str) -> list[str]:
    """Lowercased words, punctuation dropped: the unit of n-grams and shingles."""
    return re.findall(r"\w+", text.casefold())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is one n-gram, itself."""
    if len(words) < n:
        return [tuple(words)] if words else []
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def prompt_text(prompt: str | list[dict[str, str]]) -> str:
    """A prompt's text: the string itself, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


@lru_cache(maxsize=65536)
def _script(ch: str) -> str | None:
    """The script a letter counts for, or None for letters that say nothing about the language
    (Greek and mathematical letters, as used in formulas; modifier letters)."""
    name = unicodedata.name(ch, "")
    if "LATIN" in name:
        return "latin"
    if name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "IDEOGRAPHIC")):
        return "cjk"
    if name.startswith(("GREEK", "MATHEMATICAL", "MODIFIER", "DOUBLE-STRUCK", "SCRIPT", "BLACK-LETTER")):
        return None
    if 0x2100 <= ord(ch) <= 0x214F:  # letterlike symbols: ℝ, ℕ, ℓ ...
        return None
    return name.split(" ", 1)[0].lower() or None


def foreign_script_fraction(text: str) -> float:
    """Among the letters of `text`, the fraction not in its dominant script.

    Digits, punctuation and symbols are ignored, and so are LaTeX commands (`\\frac`), Greek and
    mathematical letters and lone Latin letters (`x`, `n`: variables in any language's math)."""
    if text.isascii():
        return 0.0
    text = re.sub(r"\\[A-Za-z]+", " ", text)
    counts: collections.Counter[str] = collections.Counter()
    run_script, run_len = None, 0
    for ch in text + " ":  # the sentinel space ends the last run
        script = _script(ch) if ch.isalpha() else None
        if script != run_script:
            if run_script is not None and not (run_script == "latin" and run_len == 1):
                counts[run_script] += run_len
            run_script, run_len = script, 0
        run_len += 1
    total = sum(counts.values())
    return 1.0 - max(counts.values()) / total if total else 0.0


# ------------------------------------------------------------------------------------------------
# Decontamination

_EVAL_FIELDS = ("prompt", "question", "problem", "Question")


def _load_eval_prompts(path: Path) -> list[str]:
    """Prompts of an evaluation file: .jsonl rows with a "prompt", "question" or "problem" field
    (text or chat messages), .txt with one prompt a line, or a Parquet file / save_to_disk folder
    with one of those columns (or GPQA's "Question": a local copy of a benchmark)."""
    if not path.exists():
        raise DistillError(f"{path}: decontamination file not found")
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".parquet" or path.is_dir():
        rows = open_source(str(path))
        field = next((c for c in _EVAL_FIELDS if c in rows.columns), None)
        if field is None:
            raise DistillError(f"{path}: no {', '.join(_EVAL_FIELDS)} column to decontaminate "
                               f"against (columns: {', '.join(rows.columns)})")
        texts = []
        for where, row in rows.rows():
            value = row.get(field)
            if value is None:
                continue
            if not isinstance(value, str | list):
                raise DistillError(f"{where}: {field!r} is not text (got {type(value).__name__})")
            texts.append(prompt_text(value))
        return texts
    if path.suffix != ".jsonl":
        raise DistillError(f"{path}: decontamination files must be .jsonl, .txt, .parquet or a "
                           "save_to_disk folder")
    prompts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        field = next((k for k in ("prompt", "question", "problem")
                      if isinstance(row, dict) and k in row), None)
        if field is None or not isinstance(row[field], (str, list)):
            raise DistillError(
                f"{path}:{lineno}: needs a text 'prompt', 'question' or 'problem' field")
        prompts.append(prompt_text(row[field]))
    return prompts


def _ngram_hash(gram: tuple[str, ...]) -> int:
    """A 64-bit hash of an n-gram (Python's: stable within a process, which is all dedup and
    decontamination need — neither is stored)."""
    return hash(gram)


# ------------------------------------------------------------------------------------------------
# The judge

class Judge:
    """Applies FiltersConfig to samples, counting every verdict by reason.

    Calls are thread-safe: dedup state and counts are updated under a lock.
    """

    def __init__(self, cfg: FiltersConfig):
        self.cfg = cfg
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._exact: set[tuple[str, bytes]] = set()  # (prompt id, digest of the normalised text)
        # prompt id -> shingle-hash arrays of its accepted samples (sorted, unique int64)
        self._shingles: collections.OrderedDict[str, list[np.ndarray]] = collections.OrderedDict()
        self._eval_grams: set[int] = set()
        for name in cfg.decontaminate:
            self.add_eval_prompts(_load_eval_prompts(Path(name)))

    def add_eval_prompts(self, texts) -> None:
        """Also reject prompts that share an n-gram with these evaluation prompts."""
        for text in texts:
            self._eval_grams.update(_ngram_hash(g) for g in _ngrams(_words(text),
                                                                    self.cfg.decontam_ngram))

    def is_contaminated(self, prompt: PromptRecord) -> bool:
        """Whether the prompt (any of its messages: a later turn's history may hold a benchmark
        problem) shares a word n-gram with an evaluation prompt."""
        if not self._eval_grams:
            return False
        texts = [prompt.prompt] if isinstance(prompt.prompt, str) else [
            m.get("content") or "" for m in prompt.prompt]
        return any(_ngram_hash(g) in self._eval_grams for text in texts
                   for g in _ngrams(_words(text), self.cfg.decontam_ngram))

    def judge(self, prompt: PromptRecord, sample: Sample) -> Verdict:
        """The verdict on one sample of `prompt`; counted in `counts`, and remembered for dedup
        when accepted."""
        reasoning, answer, think_reason = self._parts(sample)
        predicted = extract_answer(answer, self.cfg.answer_pattern)
        correct = None
        if prompt.reference is not None:
            correct = predicted is not None and answers_match(predicted, prompt.reference)
        reason = self._reject_reason(prompt, sample, reasoning, answer, think_reason,
                                     predicted, correct)
        with self._lock:
            if reason is None:
                reason = self._dedup(prompt.id, reasoning, answer)
            self.counts[reason or ACCEPTED] += 1
        return Verdict(reason, reasoning, answer, predicted, correct)

    def observe(self, prompt_id: str, completion: str, reasoning: str | None = None) -> None:
        """Register an accepted sample stored by an earlier run (resume), so dedup behaves as in
        an uninterrupted run; not counted. Pass `reasoning` when the backend gave it separately."""
        split = split_think(completion)
        if reasoning is None:
            reasoning, answer = split.reasoning, split.answer
        else:
            answer = split.answer if split.closed else completion.strip()
        with self._lock:
            self._remember(prompt_id, reasoning, answer)

    def forget(self, prompt_id: str) -> None:
        """Drop a finished prompt's near-duplicate state (memory); exact dedup is kept."""
        with self._lock:
            self._shingles.pop(prompt_id, None)

    # --- the checks ------------------------------------------------------------------------------

    def _parts(self, sample: Sample) -> tuple[str | None, str, str | None]:
        """(reasoning, answer, think problem or None). A server that split the reasoning out
        sends it in `sample.reasoning` and the answer in `completion`."""
        split = split_think(sample.completion)
        if sample.reasoning is not None:
            answer = split.answer if split.closed else sample.completion.strip()
            return sample.reasoning.strip(), answer, None
        if split.closed:
            return split.reasoning, split.answer, None
        return split.reasoning, split.answer, "unclosed_think" if split.opened else "no_think"

    def _reject_reason(self, prompt: PromptRecord, sample: Sample, reasoning: str | None,
                       answer: str, think_reason: str | None, predicted: str | None,
                       correct: bool | None) -> str | None:
        """The first failed check before dedup, or None."""
        cfg = self.cfg
        if self.is_contaminated(prompt):
            return "contaminated"
        if (cfg.reject_truncated or cfg.keep == "complete") and sample.finish_reason == "length":
            return "truncated"
        if cfg.require_think and think_reason is not None:
            return think_reason
        if cfg.max_completion_tokens is not None and (
                sample.completion_tokens > cfg.max_completion_tokens):
            return "too_long"
        if cfg.reject_empty_answer and not answer.strip():
            return "empty_answer"
        if cfg.max_foreign_script is not None and (
                foreign_script_fraction(reasoning if reasoning is not None else answer)
                > cfg.max_foreign_script):
            return "language_mix"
        if cfg.keep == "correct" and prompt.reference is not None:
            if predicted is None:
                return "no_answer"
            if not correct:
                return "wrong"
        return None

    # --- dedup (callers hold the lock) ----------------------------------------------------------

    @staticmethod
    def _dedup_text(reasoning: str | None, answer: str) -> str:
        return f"{reasoning or ''}\n{answer}"

    def _exact_key(self, prompt_id: str, text: str) -> tuple[str, bytes]:
        normalised = " ".join(text.split())
        return prompt_id, hashlib.blake2b(normalised.encode(), digest_size=16).digest()

    @staticmethod
    def _shingle_set(text: str) -> np.ndarray:
        """The sorted unique hashes of the text's word 5-grams (the whole text when shorter):
        each word hashed once, then the 5-grams combined as a polynomial in uint64 (wrapping)."""
        words = _words(text)
        if not words:
            return np.zeros(0, np.int64)
        ids = np.fromiter((hash(w) for w in words), np.int64, len(words)).view(np.uint64)
        n = min(_SHINGLE, len(ids))
        grams = np.zeros(len(ids) - n + 1, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                grams = grams * np.uint64(1_000_003) + ids[j:j + len(grams)]
        return np.unique(grams.view(np.int64))

    def _dedup(self, prompt_id: str, reasoning: str | None, answer: str) -> str | None:
        """"duplicate" / "near_duplicate" or None, remembering the sample when it is new."""
        if self.cfg.dedup == "none":
            return None
        text = self._dedup_text(reasoning, answer)
        if self._exact_key(prompt_id, text) in self._exact:
            return "duplicate"
        shingles = None
        if self.cfg.dedup == "near":
            shingles = self._shingle_set(text)
            for kept in self._shingles.get(prompt_id, []):
                if _jaccard(shingles, kept) >= self.cfg.near_dup_threshold:
                    return "near_duplicate"
        self._remember(prompt_id, reasoning, answer, shingles)
        return None

    def _remember(self, prompt_id: str, reasoning: str | None, answer: str,
                  shingles: np.ndarray | None = None) -> None:
        if self.cfg.dedup == "none":
            return
        text = self._dedup_text(reasoning, answer)
        self._exact.add(self._exact_key(prompt_id, text))
        if self.cfg.dedup == "near":
            if shingles is None:
                shingles = self._shingle_set(text)
            self._shingles.setdefault(prompt_id, []).append(shingles)
            self._shingles.move_to_end(prompt_id)
            while len(self._shingles) > _MAX_DEDUP_PROMPTS:
                self._shingles.popitem(last=False)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique hash arrays."""
    if a.size == 0 and b.size == 0:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)
