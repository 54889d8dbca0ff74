"""Chat formatting in one place: rendering a prompt with a tokenizer's chat template, the think
tags, and how an R1-style completion splits into reasoning and answer."""

from __future__ import annotations

from distill.errors import DistillError


def prompt_ids(tokenizer, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of a user prompt: rendered with the chat template unless `raw`."""
    if raw:
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not tokenizer.chat_template:
        raise DistillError("this model's tokenizer has no chat template; use --raw")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
