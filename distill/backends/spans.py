"""A teacher scoring a student's completions across tokenizers: the student's completion is
re-tokenized by the teacher's tokenizer, scored by the teacher (any `Scorer`), and the two
tokenizations are byte-aligned (`distill.data.align`): each span (the shortest runs of tokens
with identical bytes on both sides) gets the sum of its teacher tokens' log-probabilities, the
teacher's log-probability of the span's text, which the student's own tokens of the span can be
compared with.

The prompt is rendered with the teacher's chat template. Template-only student tokens get no
span (-1): the student's special tokens (EOS, chat markers) and a leading `<think>` the teacher's
generation prompt already wrote. A completion whose bytes are not UTF-8 text is cut before its
first undecodable token (the rest get no span). With one tokenizer nothing is re-tokenized:
every student token is its own span, EOS included.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distill.backends.base import Scorer
from distill.chat import THINK_OPEN
from distill.data.align import Spans, align, align_loose
from distill.data.records import PromptRecord
from distill.errors import DistillError

NO_SPAN = -1


@dataclasses.dataclass
class SpanScores:
    """The teacher's verdict on one student completion, in the student's tokens."""

    span_of_token: np.ndarray  # int32 [C_s]: the span each student token is in; -1: none
    teacher_logprobs: np.ndarray  # float32 [S]: the teacher's log-prob sum over each span's tokens


@dataclasses.dataclass
class _Plan:
    """One completion prepared for the teacher: the teacher's prompt and completion ids, the
    student tokens that take part (their positions) and the spans over them."""

    prompt_ids: list[int]
    teacher_ids: list[int]
    kept: np.ndarray  # int64 [C_k]: positions of the student tokens the spans cover
    spans: Spans


class SpanScorer:
    """Wraps a `Scorer` with the teacher's tokenizer and the student's (see the module)."""

    def __init__(self, scorer: Scorer, teacher_tokenizer, student_tokenizer):
        if not teacher_tokenizer.chat_template:
            raise DistillError("the teacher's tokenizer has no chat template to render prompts")
        self.scorer, self.teacher, self.student = scorer, teacher_tokenizer, student_tokenizer
        self.same = (teacher_tokenizer.vocabulary_fingerprint()
                     == student_tokenizer.vocabulary_fingerprint())
        self._student_bytes = student_tokenizer.token_bytes()
        self._teacher_bytes = teacher_tokenizer.token_bytes()
        self._template_only = _special_ids(student_tokenizer)

    def score(self, prompts: list[PromptRecord], completions: list[list[int]],
              system: str | None = None) -> list[SpanScores]:
        """The teacher's span log-probabilities of each student completion (student token ids,
        as sampled, EOS included where it ended so) given its prompt, asked with `system`."""
        plans = [self.plan(p, c, system) for p, c in zip(prompts, completions, strict=True)]
        scores = self.scorer.score([p.prompt_ids for p in plans], [p.teacher_ids for p in plans])
        return [_span_scores(p, s.logprobs, len(c))
                for p, s, c in zip(plans, scores, completions, strict=True)]

    def plan(self, prompt: PromptRecord, completion: list[int], system: str | None) -> _Plan:
        """What the teacher is asked for one completion, and how its answer maps back."""
        text = self.teacher.apply_chat_template(prompt.messages(system), add_generation_prompt=True)
        prompt_ids = self.teacher.encode(text, add_special_tokens=False)
        if self.same:
            n = len(completion)
            ends = np.arange(1, n + 1)
            return _Plan(prompt_ids, list(completion), np.arange(n), Spans(ends - 1, ends, ends - 1,
                                                                           ends))
        kept = [i for i, t in enumerate(completion) if t not in self._template_only]
        kept = kept[_opened(text, [self._student_bytes[completion[i]] for i in kept]):]
        pieces = [self._student_bytes[completion[i]] for i in kept]
        n = _decodable(pieces)
        kept, pieces = kept[:n], pieces[:n]
        teacher_ids = self.teacher.encode(b"".join(pieces).decode(), add_special_tokens=False)
        teacher_pieces = [self._teacher_bytes[i] for i in teacher_ids]
        try:
            spans = align(teacher_pieces, pieces)
        except DistillError:  # a normalizer changed the text: align what is common
            try:
                spans = align_loose(teacher_pieces, pieces)
            except DistillError:  # it changed more than whitespace (a sampled string the
                # teacher's normalizer rewrites): no span, so nothing of this sample is scored
                spans = Spans(*(np.zeros(0, np.int64) for _ in range(4)))
        return _Plan(prompt_ids, teacher_ids, np.asarray(kept, np.int64), spans)


def _special_ids(tokenizer) -> set[int]:
    """The ids that only a template writes: special added tokens and the named special tokens."""
    ids = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    named = (tokenizer.token_to_id(t) for t in tokenizer.special_tokens_map.values())
    return ids | {i for i in named if i is not None}


def _opened(prompt_text: str, pieces: list[bytes]) -> int:
    """How many leading student tokens spell a `<think>` (and the whitespace after it) that the
    teacher's rendered prompt already ends with: 0 when it does not."""
    tag = THINK_OPEN.encode()
    if not prompt_text.rstrip().endswith(THINK_OPEN):
        return 0
    head = b""
    for at, piece in enumerate(pieces, 1):
        head = (head + piece).lstrip()
        if head.rstrip() == tag:
            while at < len(pieces) and not pieces[at].strip():  # the newline(s) after the tag
                at += 1
            return at
        if not tag.startswith(head):
            return 0
    return 0


def _decodable(pieces: list[bytes]) -> int:
    """How many leading pieces join to valid UTF-8."""
    joined = b"".join(pieces)
    try:
        joined.decode()
        return len(pieces)
    except UnicodeDecodeError as e:
        ends = np.cumsum([len(p) for p in pieces])
        return int(np.searchsorted(ends, e.start, side="right"))


def _span_scores(plan: _Plan, teacher_logprobs: np.ndarray, n: int) -> SpanScores:
    """SpanScores of one completion of n student tokens from the teacher's per-token log-probs."""
    spans = plan.spans
    span_of_token = np.full(n, NO_SPAN, np.int32)
    for g in range(len(spans)):
        span_of_token[plan.kept[spans.student_start[g]:spans.student_stop[g]]] = g
    sums = [teacher_logprobs[a:b].sum(dtype=np.float64)
            for a, b in zip(spans.teacher_start, spans.teacher_stop, strict=True)]
    return SpanScores(span_of_token, np.asarray(sums, np.float32).reshape(-1))
