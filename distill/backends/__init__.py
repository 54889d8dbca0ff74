"""Model backends that sample: the in-process JAX model and OpenAI-compatible HTTP endpoints, with
their configs; `distill generate` and `distill eval` both sample through them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from distill.backends.http import HttpTeacher, HttpTeacherConfig
from distill.backends.jax import JaxTeacher, JaxTeacherConfig


class OpenAITeacherConfig(HttpTeacherConfig):
    """A model behind an OpenAI-compatible /v1/chat/completions endpoint."""

    kind: Literal["openai"] = "openai"


TeacherConfig = Annotated[JaxTeacherConfig | OpenAITeacherConfig, Field(discriminator="kind")]


def make_teacher(cfg):
    """The backend a config describes (`kind: jax` loads the model into this process)."""
    if cfg.kind == "jax":
        return JaxTeacher(cfg)

    return HttpTeacher(cfg)
