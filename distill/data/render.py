"""Rendering a trace to what a student trains on (the R1-Distill way): token ids, a loss mask and,
for logit distillation, the teacher's top-k aligned to the completion tokens.

A sample is the prompt rendered with the student's chat template and `add_generation_prompt=True`
(exactly the ids the model sees at inference), then the completion
`{reasoning}\\n</think>\\n\\n{answer}` and the EOS id. The R1 generation prompt already opens
`<think>\\n`; for templates whose generation prompt does not (e.g. ChatML), the completion starts with
`<think>\\n` itself. Prompt and completion are tokenised separately and concatenated, so the boundary
is exact and the loss mask is 1 on the completion tokens (EOS included) and 0 on the prompt.
(Rendering the whole conversation instead would lose the reasoning: the R1 template drops
everything before `</think>` from assistant turns.)

The teacher's top-k reach the completion tokens in one of two ways. Where the traces keep the
bytes of the teacher's tokens (`token_bytes`, `top_bytes`), the teacher's tokens are aligned to the
student's over the completion text (`distill.data.align`): each aligned span's first student token
gets the teacher's entries of the span's first teacher token, each entry as the student id that
spells its bytes, or the largest id of the vocabulary's token type where no student token does
(ids are unsigned in caches, and the batch's int32 reads uint32's largest as -1; the losses read
any id outside [0, V) as unmatched, V the model's vocabulary, which may be padded past the
tokenizer's), and the span's
other tokens get none. This is exact for any two tokenizers, the same one included (then every
span is one token on each side). Older traces keep ids only: their rows are taken one to one,
which holds only when the student's tokenizer is the teacher's.

Traces are rendered a batch at a time: the texts of a batch are tokenised together on every core
(`Tokenizer.encode_batch`), the same ids as one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from distill.chat import REASONING_START, completion_text
from distill.data.align import UNMATCHED, align, align_loose, map_entries
from distill.errors import DistillError

NO_TEXT = "no assistant text: the reasoning and the answer are both empty"


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One rendered trace: ids int32 [n], loss mask bool [n] (the completion, EOS included) and,
    with top-k, the teacher's entries for completion tokens from `first` on: ids [c, K] in the
    vocabulary's smallest integer type, log-probabilities float16 [c, K] (-inf: no entry)."""

    ids: np.ndarray
    mask: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    teacher_error: str | None = None  # why its top-k could not be aligned (raised if trained on)

    @property
    def first(self) -> int:
        """Index of the first completion token (the prompt's length)."""
        return int(np.argmax(self.mask))


def render_example(tokenizer, prompt: str | list[dict], reasoning: str, answer: str):
    """(ids int32 [n], loss_mask bool [n]): the prompt as the model sees it at inference (chat
    template with the generation prompt), then `{reasoning}\\n</think>\\n\\n{answer}` and EOS,
    with the loss on the completion tokens only. Reasoning and answer are stripped first."""
    (r,) = render_traces(tokenizer, [(prompt, reasoning, answer)])
    if r is None:
        raise DistillError(NO_TEXT)
    return r.ids, r.mask


def render_traces(tokenizer, traces: Sequence, top_k: int = 0, name: str = "") -> list:
    """Render a batch of traces: each a `Trace` (top-k read from it when `top_k`) or a
    (prompt, reasoning, answer) tuple. A trace without assistant text gives None; a trace whose
    top-k rows do not match the student's completion tokens has no teacher entries and its
    `teacher_error` says why (training on it is that error; held out or dropped, it is not)."""
    eos = _eos_id(tokenizer)
    items = [t if isinstance(t, tuple) else (t.prompt, t.reasoning, t.answer) for t in traces]
    texts, live = [], []
    for i, (prompt, reasoning, answer) in enumerate(items):
        reasoning, answer = (reasoning or "").strip(), (answer or "").strip()
        if reasoning or answer:
            texts.extend(render_texts(tokenizer, prompt, reasoning, answer))
            live.append(i)
    encoded = tokenizer.encode_batch(texts) if texts else []
    out: list[Rendered | None] = [None] * len(items)
    for j, i in enumerate(live):
        prompt_ids, completion_ids = encoded[2 * j], encoded[2 * j + 1]
        p, n = len(prompt_ids), len(prompt_ids) + len(completion_ids) + 1
        ids = np.empty(n, np.int32)  # filled in place: no concatenated list of a trace's ids
        ids[:p], ids[p:n - 1], ids[n - 1] = prompt_ids, completion_ids, eos
        mask = np.zeros(n, bool)
        mask[p:] = True
        teacher, error = (None, None), None
        if top_k and getattr(traces[i], "top_ids", None) is not None:
            try:
                if traces[i].top_bytes is not None:
                    teacher = align_by_bytes(traces[i], tokenizer, completion_ids, top_k, name)
                else:
                    teacher = align_teacher(traces[i], p, n, top_k, tokenizer.vocab_size, name)
            except DistillError as e:  # an error only where the trace is trained on
                error = str(e)
        out[i] = Rendered(ids, mask, *teacher, teacher_error=error)
    return out


def render_texts(tokenizer, prompt, reasoning: str, answer: str) -> tuple[str, str]:
    """The prompt text (generation prompt included) and the completion text that follows it."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    body = completion_text(reasoning, answer)
    completion = body if prompt_text.endswith(REASONING_START) else REASONING_START + body
    return prompt_text, completion


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DistillError("the student tokenizer has no EOS token; samples could not end")
    return int(tokenizer.eos_token_id)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of a vocabulary."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DistillError(f"a vocabulary of {vocab_size} ids does not fit 32-bit token ids")


def align_teacher(trace, first: int, n: int, top_k: int, vocab_size: int, name: str):
    """The trace's top-k rows for its completion tokens first..n-1 (ids [c, top_k], log-probs
    float16 [c, top_k]) when they match the student's completion one to one (the tokenizers
    agree), else an error."""
    completion = n - first
    rows = len(trace.top_ids)
    if rows not in (completion, completion - 1):  # the teacher may stop before scoring EOS
        raise DistillError(
            f"{name}: trace {trace.id}: {rows} teacher top-k rows but the student tokenizer gives "
            f"{completion} completion tokens; logit distillation needs the teacher's tokenizer "
            "(set top_k 0 and alpha 0 for SFT only)")
    if rows and int(trace.top_ids.max()) >= vocab_size:
        raise DistillError(f"{name}: trace {trace.id}: teacher token id {int(trace.top_ids.max())}"
                           f" is outside the student vocabulary ({vocab_size} ids)")
    ids, lps = fit_topk(trace.top_ids, trace.top_logprobs, top_k)
    return ids.astype(id_dtype(vocab_size)), lps


def align_by_bytes(trace, tokenizer, completion_ids: Sequence[int], top_k: int, name: str):
    """The trace's top-k for the student's completion tokens (and EOS), through the alignment of
    the teacher's tokens to the student's (see the module): ids [c, top_k] (the id type's
    largest where an entry is no student token), log-probs float16 [c, top_k] (-inf: none)."""
    where = f"{name}: trace {trace.id}"
    if len(trace.token_bytes) != len(trace.top_ids) or len(trace.top_bytes) != len(trace.top_ids):
        raise DistillError(f"{where}: {len(trace.token_bytes)} teacher tokens but "
                           f"{len(trace.top_ids)} top-k rows")
    table, vocab = tokenizer.token_bytes(), tokenizer.vocab_size
    student = [table[i] for i in completion_ids]
    try:
        skip = _student_prefix(b"".join(student), b"".join(trace.token_bytes), student, where)
        spans = align(trace.token_bytes, student[skip:])
    except DistillError as e:  # the sampled whitespace is not the rendering's: align the rest
        try:
            skip, spans = 0, align_loose(trace.token_bytes, student)
        except DistillError:
            raise DistillError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    rows, at = spans.teacher_start, spans.student_start + skip
    entries = map_entries([trace.top_bytes[r] for r in rows], tokenizer.ids_by_bytes())
    dtype = id_dtype(vocab)
    unmatched = np.iinfo(dtype).max
    if (entries == UNMATCHED).any() and unmatched < vocab:
        raise DistillError(f"{where}: a vocabulary of exactly {vocab} ids leaves no room for "
                           "the unmatched-entry id in its token type")
    entries[entries == UNMATCHED] = unmatched
    k = trace.top_ids.shape[1]
    ids = np.zeros((len(completion_ids) + 1, k), np.int64)
    lps = np.full((len(completion_ids) + 1, k), -np.inf, np.float32)
    ids[at, :entries.shape[1]], lps[at] = entries, trace.top_logprobs[rows]
    ids, lps = fit_topk(ids, lps, top_k)
    return ids.astype(dtype), lps


def _student_prefix(student: bytes, teacher: bytes, pieces: Sequence[bytes], where: str) -> int:
    """How many leading student tokens spell text the teacher's completion does not have (the
    `<think>\n` a template's generation prompt lacks): 0 when the two texts are the same."""
    if student == teacher or not student.endswith(teacher):
        return 0
    ends = np.cumsum([len(p) for p in pieces])
    cut = len(student) - len(teacher)
    if cut not in ends:
        raise DistillError(f"{where}: the teacher's completion starts inside a student token")
    return int(np.searchsorted(ends, cut)) + 1


def fit_topk(ids: np.ndarray, lps: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely entries per row (by log-probability), padded with -inf entries; the
    log-probabilities as float16 (what a cache stores: 2^-11 relative precision)."""
    order = np.argsort(-lps, axis=1, kind="stable")[:, :k]
    ids, lps = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
    pad = k - ids.shape[1]
    if pad > 0:
        ids = np.pad(ids, ((0, 0), (0, pad)))
        lps = np.pad(lps, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids, lps.astype(np.float16)
