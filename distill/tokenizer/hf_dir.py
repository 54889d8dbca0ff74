"""Reading a Hugging Face tokenizer directory's configs (special tokens, chat template) and the
JSON `save_pretrained` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError

SPECIAL_NAMES = (  # transformers' named special tokens, in this order
    "bos_token", "eos_token", "unk_token", "pad_token")


def read_hf_config(directory: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json, with chat_template.jinja on top."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            try:
                config.update(json.loads((directory / name).read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise DistillError(f"cannot read {directory / name}: {e}") from e
    if (directory / "chat_template.jinja").is_file():
        config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return config


def named_special_tokens(config: dict) -> dict[str, str | None]:
    """Named special tokens from a config, where each is a string or an AddedToken dict."""
    def text(value):
        return value.get("content") if isinstance(value, dict) else value
    return {name: text(config.get(name)) for name in SPECIAL_NAMES}


def pick_template(template) -> str | None:
    """A config's chat template: a string, or a list of named ones (take "default")."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default", next(iter(named.values()), None))
    return template


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
