"""What every sampling backend is: the `Sampler` protocol `distill generate` and `distill eval`
call, whatever runs the model (this process, an OpenAI-compatible server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from distill.data.records import PromptRecord, Sample
from distill.sampling import SamplingParams


@runtime_checkable
class Sampler(Protocol):
    """A model that samples completions of prompts.

    identity: what traces record as their `teacher` (JSON-able, `kind` and `model` at least, no
    secrets). tokenizer_identity: the model's tokenizer (`distill.tokenizer.tokenizer_identity`),
    None where unknown.
    """

    identity: dict
    tokenizer_identity: dict | None

    def complete(self, prompts: list[PromptRecord], params: SamplingParams,
                 system: str | None = None,
                 on_sample: Callable[[Sample], None] | None = None) -> list[list[Sample]]:
        """`params.n` samples for each prompt, in order, each prompt asked with the system
        prompt `system` (None: none); `on_sample` sees each sample as it is made."""
        ...

    def close(self) -> None:
        """Release what the sampler holds (connections); it is not used afterwards."""
        ...
