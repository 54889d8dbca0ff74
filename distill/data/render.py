"""Rendering a trace to what a student trains on (the R1-Distill way): token ids and a loss mask.

A sample is the prompt rendered with the student's chat template and `add_generation_prompt=True`
(exactly the ids the model sees at inference), then the completion
`{reasoning}\\n</think>\\n\\n{answer}` and the EOS id. The R1 generation prompt already opens
`<think>\\n`; for templates whose generation prompt does not (e.g. ChatML), the completion starts with
`<think>\\n` itself. Prompt and completion are tokenised separately and concatenated, so the boundary
is exact and the loss mask is 1 on the completion tokens (EOS included) and 0 on the prompt.
(Rendering the whole conversation instead would lose the reasoning: the R1 template drops
everything before `</think>` from assistant turns.)
"""

from __future__ import annotations

import numpy as np

from distill.chat import REASONING_START, completion_text
from distill.errors import DistillError


def render_example(tokenizer, prompt: str | list[dict], reasoning: str, answer: str):
    """(ids int32 [n], loss_mask bool [n]): the prompt as the model sees it at inference (chat
    template with the generation prompt), then `{reasoning}\\n</think>\\n\\n{answer}` and EOS,
    with the loss on the completion tokens only. Reasoning and answer are stripped first."""
    reasoning, answer = (reasoning or "").strip(), (answer or "").strip()
    if not reasoning and not answer:
        raise DistillError("no assistant text: the reasoning and the answer are both empty")
    prompt_ids, completion_text = _render(tokenizer, prompt, reasoning, answer)
    completion_ids = tokenizer.encode(completion_text, add_special_tokens=False)
    completion_ids.append(_eos_id(tokenizer))
    ids = np.asarray(prompt_ids + completion_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(prompt_ids):] = True
    return ids, mask


def _render(tokenizer, prompt, reasoning: str, answer: str) -> tuple[list[int], str]:
    """Prompt ids (generation prompt included) and the completion text that follows them."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    body = completion_text(reasoning, answer)
    completion = body if prompt_text.endswith(REASONING_START) else REASONING_START + body
    return tokenizer.encode(prompt_text, add_special_tokens=False), completion


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DistillError("the student tokenizer has no EOS token; samples could not end")
    return int(tokenizer.eos_token_id)
