"""How to sample: `SamplingParams`, the one validated sampling-settings type (the bounds every
sampling table shares are declared here once), and the per-row filters (temperature, top-k,
top-p).

Models sample through the inference engine (`distill.inference`), which takes these settings per
request as data.
"""

from __future__ import annotations

from typing import Annotated

import jax
import jax.numpy as jnp
from pydantic import Field

from distill.config import Frozen

# The bounds of every sampling setting, declared once: the engine's SamplingParams, `distill
# generate`'s sampling table, `distill eval`'s protocol and the server's requests all use them.
Temperature = Annotated[float, Field(ge=0)]  # 0 is greedy
TopP = Annotated[float, Field(gt=0, le=1)]  # 1 keeps every token
TopK = Annotated[int, Field(ge=0)]  # 0 keeps every token
NewTokens = Annotated[int, Field(ge=1)]
Samples = Annotated[int, Field(ge=1)]  # completions per prompt
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # stored top-k log-probabilities (OpenAI's cap)


class SamplingFields(Frozen):
    """The settings every sampling table shares, declared once: the engine's `SamplingParams`,
    `distill generate`'s `sampling` and `distill eval`'s `protocol` add to these (and may change
    their defaults). `n` is the number of samples per prompt everywhere."""

    max_new_tokens: NewTokens = 256
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    n: Samples = 1
    seed: int = 0

    def params(self) -> SamplingParams:
        """The engine's settings this table describes (its other fields, such as the system
        prompt, left out): the one conversion from a config's sampling table."""
        fields = type(self).model_fields
        return SamplingParams(**{k: getattr(self, k) for k in SamplingParams.model_fields
                                 if k in fields})


class SamplingParams(SamplingFields):
    """How to sample. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.
    Invalid values raise pydantic's ValidationError (a ValueError)."""

    stop: tuple[str, ...] = ()  # stop strings, applied to the decoded text
    logprobs: Annotated[int, Field(ge=0)] = 0  # also return each token's top-k log-probabilities

    def greedy(self) -> SamplingParams:
        """One sample at temperature 0, no filters, the same budget, seed and stop strings."""
        return self.model_copy(update={"temperature": 0.0, "top_p": 1.0, "top_k": 0, "n": 1})


class SystemPrompt(Frozen):
    """The system prompt a config asks every prompt with (None: none; R1 recommends none, all
    instructions in the user prompt). Part of a sampling table, not of the engine's settings."""

    system: str | None = None


def filter_logits(logits_bv: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed tokens get -inf."""
    logits = logits_bv.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < top_p  # the smallest set whose mass reaches top_p (always >= 1 token)
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits_bv, key, params: SamplingParams) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if params.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_bv, params.temperature, params.top_k, params.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
