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

Traces are rendered a batch at a time: the texts of a batch are tokenised together on every core
(`Tokenizer.encode_batch`), the same ids as one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from distill.chat import REASONING_START, completion_text
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
