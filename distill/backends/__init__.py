"""Model backends that sample, behind one protocol (`Sampler`), and their registry: `kind` ->
(config table, sampler). `distill generate`'s teacher and `distill eval`'s models are tables of
the union `sampler_union` builds from it, and `make_sampler` opens the one a table describes.

A new backend is its config class (with `kind: Literal["name"] = "name"`) and a class
implementing `Sampler`, registered with one `register` line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from distill.backends.base import Sampler
from distill.backends.http import OpenAISampler, OpenAISamplerConfig
from distill.backends.jax import JaxSampler, JaxSamplerConfig
from distill.config import Frozen, tagged_union

DEFAULT_KIND = "jax"  # a table without `kind` runs in process


@dataclasses.dataclass(frozen=True)
class Backend:
    """One registered backend: its config table, the sampler it opens, and a few words on where
    the model runs (for the error that lists the kinds)."""

    config: type[Frozen]
    sampler: Callable[[Any], Sampler]
    runs: str


BACKENDS: dict[str, Backend] = {}


def register(config: type[Frozen], sampler: Callable[[Any], Sampler], runs: str) -> None:
    """Add a backend under the kind its config's `kind` field defaults to."""
    BACKENDS[config.model_fields["kind"].default] = Backend(config, sampler, runs)


register(JaxSamplerConfig, JaxSampler, "in process")
register(OpenAISamplerConfig, OpenAISampler, "an OpenAI-compatible server")


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


__all__ = ["BACKENDS", "Backend", "Sampler", "SamplerConfig", "make_sampler", "register",
           "sampler_union"]
