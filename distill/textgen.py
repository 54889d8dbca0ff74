"""Text in, text out over any MODEL path: chat template, tokenize, generate, decode."""

from __future__ import annotations

from distill.errors import DistillError
from distill.sampling import SamplingParams, generate


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


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the config's, plus the tokenizer's EOS."""
    ids = list(model.config.eos_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def sample_text(model_path, prompt: str, params: SamplingParams, *, system=None, raw=False,
                dtype="float32", overrides=()) -> str:
    """Load MODEL, generate one completion for `prompt`, return its text."""
    from distill.pretrained import load_pretrained

    model, tokenizer = load_pretrained(model_path, param_dtype=dtype, overrides=overrides)
    if tokenizer is None:
        raise DistillError(f"{model_path}: no tokenizer found next to the model")
    ids = prompt_ids(tokenizer, prompt, system, raw)
    [completion] = generate(model, [ids], params, stop_ids(model, tokenizer), tokenizer,
                            pad_id=tokenizer.pad_token_id or 0)
    return completion.text
