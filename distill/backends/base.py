"""What every backend is: the `Sampler` protocol `distill generate` and `distill eval` call, and
the `Scorer` protocol on-policy distillation's teacher answers through, whatever runs the model
(this process, an OpenAI-compatible server)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from distill.data.records import PromptRecord, Sample
from distill.inference import TokenScores
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
                 on_sample: Callable[[int, Sample], None] | None = None,
                 indices: Sequence[Sequence[int]] | None = None) -> list[list[Sample]]:
        """`params.n` samples for each prompt, in order, each prompt asked with the system
        prompt `system` (None: none); `on_sample(k, sample)` sees each sample as it is made,
        with the position `k` of its prompt in `prompts`.

        Sample i of a prompt is drawn with the seed `distill.sampling.sample_seed(params.seed,
        prompt id, i)`, whatever else is asked beside it. `indices`: per prompt, the sample
        indices to make instead of 0..n-1 (a resumed eval asks only for what it lacks); each
        prompt's list then holds those samples, in index order."""
        ...

    def close(self) -> None:
        """Release what the sampler holds (connections); it is not used afterwards."""
        ...


class Piece(NamedTuple):
    """What one continuation added: its text, its generated tokens, why it ended ("stop" at an
    end-of-sequence token, "length" at its max_new_tokens)."""

    text: str
    tokens: int
    finish_reason: str


@runtime_checkable
class Extender(Protocol):
    """A sampler that also continues given token ids (what budget forcing drives,
    `distill.backends.forcing`): in process through the engine, served through `/v1/completions`.
    `tokenizer`: the model's (renders prompts and continued texts into those ids)."""

    tokenizer: object

    def extend(self, prefixes: Sequence[Sequence[int]], params: Sequence[SamplingParams],
               reserve: int = 0) -> list[Piece]:
        """One sample (params[i].n == 1, seeded by params[i].seed) continuing each prefix, in
        order, all in flight together. `reserve`: tokens per sequence later calls may need
        (an engine sized once for all rounds compiles once)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """A model that gives its log-probabilities to tokens it is handed (the teacher of on-policy
    distillation scoring the student's samples), at temperature 1.

    identity, tokenizer_identity: as `Sampler`'s; the token ids a scorer takes and gives are in
    that tokenizer. vocab_size: the width of a whole-vocabulary answer, None where unknown.
    """

    identity: dict
    tokenizer_identity: dict | None
    vocab_size: int | None

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              top_k: int | None = 0) -> list[TokenScores]:
        """Per (prompt, completion) pair, in order, the log-probability of each completion token
        given the prompt and the completion before it; top_k > 0 adds the k most likely entries
        at each completion position, None the whole vocabulary (see
        `distill.inference.score_sequences`)."""
        ...

    def close(self) -> None:
        """Release what the scorer holds; it is not used afterwards."""
        ...
