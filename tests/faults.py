"""Fault injection for the tests: an ASGI wrapper around `distill serve`'s app that makes a seeded
share of chat requests fail, to drill clients' retry logic (test-only machinery: the server itself
has none).

    app = with_faults(build_app(model, tokenizer, "toy"), FaultConfig(rate=0.3, seed=1))
    with ServerThread(app) as url: ...
    app.state.faults   # Counter of the faults injected, by kind
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from typing import Literal

from pydantic import Field

from distill.config import Frozen

CHAT = "/v1/chat/completions"


class FaultConfig(Frozen):
    """Each chat request draws: with probability `rate` it gets one of `kinds` (chosen uniformly):
    "429" (Too Many Requests with `Retry-After: retry_after_s`), "500", "hang" (no answer for
    `hang_s` seconds, or until the client gives up when None, then the normal answer) or "drop"
    (the connection closes without a response)."""

    rate: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    kinds: tuple[Literal["429", "500", "hang", "drop"], ...] = ("429", "500", "hang", "drop")
    retry_after_s: int = Field(1, ge=0)
    hang_s: float | None = Field(None, ge=0)


class _QuietDrops(logging.Filter):
    """Hides uvicorn's error line for each connection dropped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class FaultyApp:
    """The wrapped app, with `state` (the inner app's) and `state.faults` counting by kind."""

    def __init__(self, app, cfg: FaultConfig):
        self.app, self.cfg, self.rng = app, cfg, random.Random(cfg.seed)
        self.state = app.state
        self.state.faults = Counter()
        server_log = logging.getLogger("uvicorn.error")
        if "drop" in cfg.kinds and not any(isinstance(f, _QuietDrops) for f in server_log.filters):
            server_log.addFilter(_QuietDrops())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(receive)  # read first: a hang then sees the client leave
        kind = None
        if self.cfg.kinds and self.rng.random() < self.cfg.rate:
            kind = self.rng.choice(self.cfg.kinds)
            self.state.faults[kind] += 1
        if kind == "429":
            return await _json_error(send, 429, "fault injected: rate limited",
                                     [(b"retry-after", str(self.cfg.retry_after_s).encode())])
        if kind == "500":
            return await _json_error(send, 500, "fault injected: internal error")
        if kind == "drop":
            return await _drop(send)
        if kind == "hang" and await _hang(receive, self.cfg.hang_s):
            return None  # the client left
        return await self.app(scope, _replay(body, receive), send)


def with_faults(app, cfg: FaultConfig) -> FaultyApp:
    return FaultyApp(app, cfg)


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json_error(send, status: int, message: str, headers=()) -> None:
    kind = {429: "rate_limit_error"}.get(status, "server_error")
    payload = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _drop(send) -> None:
    """Close the connection without a response. ASGI has no message for that, so this starts a
    response with a header name h11 refuses: the server (uvicorn with h11, as `ServerThread` runs
    it) raises before it writes a byte, and closes the connection."""
    with contextlib.suppress(Exception):
        await send({"type": "http.response.start", "status": 500,
                    "headers": [(b"drop connection", b"1")]})


async def _hang(receive, seconds: float | None) -> bool:
    """Wait `seconds` (None: until the client disconnects); True when the client left."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        timeout = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            continue
        if message["type"] == "http.disconnect":
            return True
    return False
