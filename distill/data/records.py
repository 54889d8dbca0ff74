"""The records that flow through trace generation: prompts in, teacher samples out, trace rows stored.

The trace row schema (TRACE_SCHEMA) is the project's stable on-disk contract, documented in
teacher_traces/README.md. Optional top-k log-probabilities are stored per completion token as
lists of lists (ids and log-probabilities), with the teacher tokenizer's identity in the manifest.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt: a stable id, the prompt (text, or chat messages [{role, content}, ...]), the
    reference answer (None when there is none) and free metadata (e.g. {"difficulty": 3})."""

    id: str
    prompt: str | list[dict[str, str]]
    reference: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def messages(self, system: str | None = None) -> list[dict[str, str]]:
        """The prompt as chat messages (a text prompt is one user turn)."""
        msgs = list(self.prompt) if isinstance(self.prompt, list) else [
            {"role": "user", "content": self.prompt}]
        if system and not any(m.get("role") == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        return msgs


@dataclasses.dataclass(frozen=True)
class Thinking:
    """How a budget-forced sample thought (`distill.backends.forcing`): its thinking tokens,
    whether its think block was closed at the budget, and the wait texts inserted."""

    tokens: int
    forced: bool
    waits: int = 0


@dataclasses.dataclass
class Sample:
    """One teacher completion of one prompt, as a backend returns it.

    `reasoning` is set when the backend received it separately (an OpenAI-compatible server's
    `reasoning_content`); otherwise it is None and the reasoning is read from `<think>` in
    `completion`. `top_ids` / `top_logprobs`: per completion token, the teacher's top-k.
    `token_bytes` / `top_bytes`: the bytes each sampled token and each top-k entry stands for in
    the teacher's text (what aligns them to another tokenizer's tokens), where known.
    """

    sample_index: int
    completion: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    top_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    token_bytes: list[bytes] | None = None
    top_bytes: list[list[bytes]] | None = None
    thinking: Thinking | None = None  # set by budget forcing


_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

# One row of a shard. `prompt` is stored as text; chat prompts are stored in `messages` too.
TRACE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("prompt_id", pa.string()),
    ("sample_index", pa.int32()),
    ("prompt", pa.string()),
    ("messages", _MESSAGES),
    ("reasoning", pa.string()),
    ("answer", pa.string()),
    ("completion", pa.string()),
    ("reference", pa.string()),
    ("predicted", pa.string()),  # the final answer extracted for checking (e.g. inside \boxed{})
    ("correct", pa.bool_()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("teacher", pa.string()),
    ("sampling", pa.struct([("temperature", pa.float32()), ("top_p", pa.float32()),
                            ("max_new_tokens", pa.int32()), ("seed", pa.int64())])),
    ("meta", pa.string()),  # the prompt's metadata as JSON (e.g. synthetic difficulty)
    ("top_ids", pa.list_(pa.list_(pa.int32()))),
    ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("token_bytes", pa.list_(pa.binary())),
    ("top_bytes", pa.list_(pa.list_(pa.binary()))),
])


def record_id(prompt_id: str, sample_index: int) -> str:
    """The stable id of a trace: prompt id and sample index."""
    return f"{prompt_id}#{sample_index}"
