"""Model backends that sample and score, behind two protocols (`Sampler`, `Scorer`), and their
registry: `kind` -> (config table, sampler, scorer). `distill generate`'s teacher and `distill
eval`'s models are tables of the union `sampler_union` builds from it; `make_sampler` opens the
sampler a table describes, `make_scorer` its scorer (on-policy distillation's teacher).

A new backend is its config class (with `kind: Literal["name"] = "name"`), a class implementing
`Sampler` and, where the model can score given tokens, one implementing `Scorer`, registered with
one `register` line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from distill.backends.base import Sampler, Scorer
from distill.backends.http import OpenAISampler, OpenAISamplerConfig, OpenAIScorer
from distill.backends.jax import JaxSampler, JaxSamplerConfig, JaxScorer
from distill.backends.spans import SpanScorer, SpanScores
from distill.config import Frozen, tagged_union
from distill.errors import DistillError

DEFAULT_KIND = "jax"  # a table without `kind` runs in process


@dataclasses.dataclass(frozen=True)
class Backend:
    """One registered backend: its config table, the sampler it opens, a few words on where the
    model runs (for the error that lists the kinds), and the scorer it opens (None: it cannot
    score given tokens)."""

    config: type[Frozen]
    sampler: Callable[[Any], Sampler]
    runs: str
    scorer: Callable[[Any], Scorer] | None = None


BACKENDS: dict[str, Backend] = {}


def register(config: type[Frozen], sampler: Callable[[Any], Sampler], runs: str,
             scorer: Callable[[Any], Scorer] | None = None) -> None:
    """Add a backend under the kind its config's `kind` field defaults to."""
    BACKENDS[config.model_fields["kind"].default] = Backend(config, sampler, runs, scorer)


register(JaxSamplerConfig, JaxSampler, "in process", JaxScorer)
register(OpenAISamplerConfig, OpenAISampler, "an OpenAI-compatible server", OpenAIScorer)


def sampler_union(extra: type[Frozen] | None = None) -> Any:
    """The config type of any registered backend, told apart by `kind` (default "jax"). With
    `extra`, each backend's table also takes extra's fields (`distill eval`'s model entries)."""
    members = {kind: b.config if extra is None else type(
        f"{b.config.__name__.removesuffix('Config')}{extra.__name__}", (b.config, extra),
        {"__module__": extra.__module__, "__doc__": f"{b.config.__doc__}\n\n{extra.__doc__}"})
        for kind, b in BACKENDS.items()}
    known = [f"{kind} ({b.runs})" for kind, b in BACKENDS.items()]
    return tagged_union(members, DEFAULT_KIND, " or ".join([", ".join(known[:-1]), known[-1]]
                                                           if len(known) > 1 else known))


SamplerConfig = sampler_union()


def make_sampler(cfg) -> Sampler:
    """The backend a config table describes, opened (`kind: jax` loads the model into this
    process); close it when done."""
    return BACKENDS[cfg.kind].sampler(cfg)


def make_scorer(cfg) -> Scorer:
    """The scorer of the backend a config table describes, opened (`kind: jax` loads the model
    into this process; `kind: openai` asks the server as `cfg.scoring` says); close it when
    done. A backend that cannot score is a DistillError."""
    backend = BACKENDS[cfg.kind]
    if backend.scorer is None:
        raise DistillError(f"backend kind {cfg.kind!r} ({backend.runs}) cannot score given "
                           "tokens; on-policy distillation needs one that can")
    return backend.scorer(cfg)


__all__ = ["BACKENDS", "Backend", "Sampler", "SamplerConfig", "Scorer", "SpanScorer", "SpanScores",
           "make_sampler", "make_scorer", "register", "sampler_union"]
