"""The server's protocol side: the accepted request bodies (`ChatRequest`, `CompletionRequest`:
OpenAI's fields with vLLM's extensions), error answers, and turning a growing completion into
streamed text deltas."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from distill.chat import hold_back, split_reasoning
from distill.sampling import NewTokens, Samples, Temperature, TopLogprobs, TopP

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


# ---------------------------------------------------------------------------------------------
# Reasoning split and streaming text


def visible_text(text: str, stops) -> str:
    """The part of a growing completion that is final: cut at a stop string, less a tail that may
    become one, less an unfinished UTF-8 character (decoded as U+FFFD)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        return text[:cut]
    return hold_back(text, stops).rstrip("\ufffd")


class StreamText:
    """Turns successive versions of one choice's text into reasoning / content deltas."""

    def __init__(self, opened: bool, stops=()):
        self.opened, self.stops = opened, tuple(stops)
        self.sent = {"reasoning_content": "", "content": ""}

    def update(self, text: str, final: bool = False) -> dict[str, str]:
        """The delta ({"reasoning_content": ..., "content": ...}, keys with new text only)."""
        if not final:
            text = visible_text(text, self.stops)
        reasoning, content = split_reasoning(text, self.opened, final)
        delta = {}
        for key, part in (("reasoning_content", reasoning), ("content", content)):
            part = part or ""
            if len(part) > len(self.sent[key]):
                delta[key] = part[len(self.sent[key]):]
                self.sent[key] = part
        return delta


# ---------------------------------------------------------------------------------------------
# Requests


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampled(BaseModel):
    """The sampling fields both endpoints take (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=-1)  # vLLM's convention: -1 (and 0) keep every token
    n: Annotated[Samples, Field(le=128)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class ChatRequest(_Sampled):
    """The accepted body of POST /v1/chat/completions (unknown fields are ignored)."""

    messages: list[_Message] = Field(min_length=1)
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    stream_options: _StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampled):
    """The accepted body of POST /v1/completions (vLLM's: `prompt` as text or token ids,
    `prompt_logprobs` k for the prompt tokens' log-probabilities and top k, -1 for the whole
    vocabulary; `logprobs` k for the completion's, in the legacy completions shape). Unknown
    fields are ignored."""

    prompt: str | list[int]
    max_tokens: NewTokens = 16  # OpenAI's and vLLM's default
    logprobs: TopLogprobs | None = None
    prompt_logprobs: int | None = Field(None, ge=-1)
    add_special_tokens: bool = True  # vLLM's: a text prompt gets the tokenizer's BOS


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status,
                        headers=headers)


def parse_request(body: bytes, schema: type[BaseModel] = ChatRequest):
    """The request `body` validated as `schema` (chat completions by default), or BadRequest
    naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise BadRequest(f"{where}: {err['msg']}") from None
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise BadRequest("top_logprobs: needs logprobs=true")
    return req


