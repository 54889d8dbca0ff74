"""OpenAI-compatible chat completions over any loaded model: what `distill serve MODEL` runs.

Endpoints: `POST /v1/chat/completions` (a JSON answer, or server-sent events with `"stream": true`)
and `GET /v1/models`. Requests queue for one batching worker thread, which runs every waiting
request with compatible sampling settings through one `distill.sampling.generate` call. Reasoning
inside `<think>...</think>` comes back split out as `message.reasoning_content`, as vLLM's and
DeepSeek's reasoning parsers do.

Request fields: `model`, `messages` (required), `max_tokens` / `max_completion_tokens`,
`temperature` (default 1.0, as OpenAI), `top_p`, `top_k` (vLLM's extension; 0 or -1 disable it),
`n`, `seed`, `stop`, `stream`, `stream_options.include_usage`, `logprobs` + `top_logprobs` (0-20),
`return_tokens_as_token_ids` (vLLM's: logprob tokens read "token_id:123") and
`chat_template_kwargs` (passed to the chat template). Unknown fields are ignored, like vLLM.
A stream sends text deltas as decoding proceeds (every STOP_CHECK_EVERY tokens) and each choice's
logprobs, when asked for, whole in its finishing chunk.

A `seed` makes a sampled request reproducible when it runs alone (it then draws exactly what
`generate` with that seed draws); batched with other requests, its rows share one random stream
with theirs. `max_batch=1` makes every seeded request reproducible.

`FaultConfig` makes a seeded share of requests fail (429 + Retry-After, 500, a hang, a dropped
connection), to drill clients' retry logic; `distill serve` exposes it as hidden options.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import random
import socket
import threading
import time
import uuid
import zlib
from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from distill.chat import THINK_OPEN, hold_back, split_reasoning
from distill.config import Frozen, read_api_key
from distill.errors import DistillError
from distill.sampling import (
    Completion,
    NewTokens,
    Samples,
    SamplingParams,
    Temperature,
    TopLogprobs,
    TopP,
    generate,
)

log = logging.getLogger(__name__)

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


class ChatRequest(BaseModel):
    """The accepted body of POST /v1/chat/completions (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: NewTokens | None = None
    max_completion_tokens: NewTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=-1)  # vLLM's convention: -1 (and 0) keep every token
    n: Annotated[Samples, Field(le=128)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    return_tokens_as_token_ids: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status,
                        headers=headers)


def _parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _BadRequest("the request body must be a JSON object")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise _BadRequest(f"{where}: {err['msg']}") from None
    if req.top_logprobs and not req.logprobs:
        raise _BadRequest("top_logprobs: needs logprobs=true")
    return req


# ---------------------------------------------------------------------------------------------
# The batching engine


@dataclasses.dataclass
class _Job:
    """One chat request waiting for, or in, a generate call."""

    ids: list[int]  # the rendered prompt's token ids
    n: int
    max_tokens: int
    key: tuple  # compatible settings: (temperature, top_p, top_k, stop, logprobs k)
    seed: int | None
    opened: bool  # the prompt ends inside a think block
    stream: bool
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future  # list[Completion] (one per choice) or an exception
    events: asyncio.Queue | None = None  # streaming: ("delta", choice, delta) items

    def post(self, fn, *args) -> None:
        """Run `fn(*args)` on the request's event loop (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        (future.set_exception if isinstance(value, BaseException) else future.set_result)(value)


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


class BatchEngine:
    """Runs queued chat jobs in batches on one worker thread.

    Each round takes the oldest waiting job and every other waiting job with the same sampling
    settings (up to `max_batch` choices), pads the batch to a power of two and the token budget
    to a power of two (fewer shapes to compile), calls `generate` once, and cuts each choice to
    its own `max_tokens`. `generate_calls` and `jobs_done` count what it did.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, batch_wait_ms: float = 10.0):
        from distill.sampling import stop_ids

        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.eos_ids = stop_ids(model, tokenizer)
        self.max_positions = model.config.max_position_embeddings
        self.generate_calls = self.jobs_done = 0
        self._queue: list[_Job] = []
        self._cond = threading.Condition()
        self._gate = threading.Lock()  # held by `paused()`
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

    # -- lifecycle

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="distill-serve-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for job in self._queue:
            job.post(_settle, job.result, RuntimeError("the server is shutting down"))
        self._queue.clear()

    @contextlib.contextmanager
    def paused(self):
        """Hold the worker between rounds (jobs keep queueing), e.g. to observe batching."""
        with self._gate:
            yield self

    @property
    def pending(self) -> int:
        """Jobs waiting for a round."""
        with self._cond:
            return len(self._queue)

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    # -- the worker

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            time.sleep(self.batch_wait_s)  # let requests that arrive together share the round
            with self._gate:
                group = self._take_group()
                try:
                    self._run_group(group)
                except Exception as e:  # a failed round fails its requests, not the server
                    log.exception("generation failed")
                    for job in group:
                        job.post(_settle, job.result, e)

    def _take_group(self) -> list[_Job]:
        with self._cond:
            first, group, rest, rows = self._queue[0], [], [], 0
            for job in self._queue:
                if job.key == first.key and (not group or rows + job.n <= self.max_batch):
                    group.append(job)
                    rows += job.n
                else:
                    rest.append(job)
            self._queue = rest
        return group

    def _params(self, group: list[_Job]) -> SamplingParams:
        temperature, top_p, top_k, stop, k = group[0].key
        longest = max(len(job.ids) for job in group)
        budget = min(max(_next_pow2(max(job.max_tokens for job in group)), 16),
                     self.max_positions - longest)
        return SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=self._seed(group), stop=stop, logprobs=k)

    def _seed(self, group: list[_Job]) -> int:
        seeds = [job.seed for job in group]
        if any(s is None for s in seeds):
            return self._rng.randrange(2**31)
        if len(seeds) == 1:
            return seeds[0] & 0x7FFFFFFF
        return zlib.crc32(json.dumps(seeds).encode()) & 0x7FFFFFFF

    def _run_group(self, group: list[_Job]) -> None:
        rows = [(job, c) for job in group for c in range(job.n)]
        prompts = [job.ids for job, _ in rows]
        size = min(_next_pow2(len(rows)), max(self.max_batch, len(rows)))
        prompts += [prompts[-1]] * (size - len(rows))  # padding rows, dropped below
        params = self._params(group)
        hook = self._stream_hook(rows, params.stop) if any(job.stream for job in group) else None
        completions = generate(self.model, prompts, params, self.eos_ids, self.tokenizer,
                               pad_id=self.tokenizer.pad_token_id or 0, on_chunk=hook)
        self.generate_calls += 1
        for job in group:
            mine = [self._cut(c, job.max_tokens, params.stop)
                    for (owner, _), c in zip(rows, completions, strict=False) if owner is job]
            if job.events is not None:
                for c, delta in enumerate(hook.final_deltas(job, mine)):
                    if delta:
                        job.post(job.events.put_nowait, ("delta", c, delta))
            job.post(_settle, job.result, mine)
            self.jobs_done += 1

    def _stream_hook(self, rows, stops) -> _StreamHook:
        return _StreamHook(rows, self.tokenizer, set(self.eos_ids), stops)

    def _cut(self, c: Completion, limit: int, stops) -> Completion:
        """`c` as if generated with max_new_tokens=limit (the round may have run longer)."""
        ids = c.token_ids
        ended_by_eos = c.finish_reason == "stop" and c.text == self.tokenizer.decode(ids)
        if len(ids) < limit or (len(ids) == limit and not ended_by_eos):
            return c
        ids = ids[:limit]
        text = self.tokenizer.decode(ids)
        cut = dataclasses.replace(c, token_ids=ids, text=text, finish_reason="length")
        if c.token_logprobs is not None:
            cut.token_logprobs = c.token_logprobs[:limit]
            cut.top_ids, cut.top_logprobs = c.top_ids[:limit], c.top_logprobs[:limit]
        return cut


class _StreamHook:
    """generate's on_chunk for a round with streaming jobs: decodes each streaming choice's text so
    far and posts its deltas to the job's event queue."""

    def __init__(self, rows, tokenizer, eos: set[int], stops):
        self.rows, self.tokenizer, self.eos = rows, tokenizer, eos
        self.ids: list[list[int]] = [[] for _ in rows]
        self.text = {id(job): [StreamText(job.opened, stops) for _ in range(job.n)]
                     for job, _ in rows if job.stream}

    def __call__(self, new_rows: list[list[int]]) -> None:
        for j, (job, c) in enumerate(self.rows):
            if not job.stream or not new_rows[j]:
                continue
            ids = self.ids[j]
            ids += new_rows[j]
            kept = [t for t in ids[: job.max_tokens + 1] if t not in self.eos][: job.max_tokens]
            delta = self.text[id(job)][c].update(self.tokenizer.decode(kept))
            if delta:
                job.post(job.events.put_nowait, ("delta", c, delta))

    def final_deltas(self, job: _Job, completions: list[Completion]) -> list[dict]:
        """The last delta of each of the job's choices, from its final text."""
        return [self.text[id(job)][i].update(c.text, final=True) for i, c in enumerate(completions)]


# ---------------------------------------------------------------------------------------------
# Faults


class FaultConfig(Frozen):
    """Make a seeded share of chat requests fail, to drill clients' retry logic.

    Each request draws: with probability `rate` it gets one of `kinds` (chosen uniformly): "429"
    (Too Many Requests with `Retry-After: retry_after_s`), "500", "hang" (no answer for `hang_s`
    seconds, or until the client gives up when None, then the normal answer) or "drop" (the
    connection closes without a response).
    """

    rate: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    kinds: tuple[Literal["429", "500", "hang", "drop"], ...] = ("429", "500", "hang", "drop")
    retry_after_s: int = Field(1, ge=0)
    hang_s: float | None = Field(None, ge=0)


class _DropConnection(Response):
    """Close the connection without sending a response.

    ASGI has no message for that, so this starts a response with a header name h11 refuses: the
    server (uvicorn with its h11 protocol, as `serve` and `ServerThread` run it) raises before it
    writes a byte, and closes the connection because the app returned mid-response.
    """

    def __init__(self):
        super().__init__(status_code=500)

    async def __call__(self, scope, receive, send) -> None:
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"drop connection", b"1")]})


class _QuietDrops(logging.Filter):
    """Hides uvicorn's error line for each connection dropped on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class _Faults:
    def __init__(self, cfg: FaultConfig):
        self.cfg, self.rng, self.injected = cfg, random.Random(cfg.seed), Counter()
        server_log = logging.getLogger("uvicorn.error")
        if "drop" in cfg.kinds and not any(isinstance(f, _QuietDrops) for f in server_log.filters):
            server_log.addFilter(_QuietDrops())

    async def apply(self, request: Request) -> Response | None:
        """A fault response for this request, or None to answer it normally (maybe after a hang)."""
        if not self.cfg.kinds or self.rng.random() >= self.cfg.rate:
            return None
        kind = self.rng.choice(self.cfg.kinds)
        self.injected[kind] += 1
        if kind == "429":
            return _error(429, "fault injected: rate limited",
                          headers={"Retry-After": str(self.cfg.retry_after_s)})
        if kind == "500":
            return _error(500, "fault injected: internal error")
        if kind == "drop":
            return _DropConnection()
        await _hang(request, self.cfg.hang_s)
        return None


async def _hang(request: Request, seconds: float | None) -> None:
    deadline = None if seconds is None else time.monotonic() + seconds
    while deadline is None or time.monotonic() < deadline:
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The app


class _Server:
    """The endpoints' shared state: model, engine, name, key, faults."""

    def __init__(self, model, tokenizer, model_name: str, engine: BatchEngine, api_key: str | None,
                 faults: FaultConfig | None, default_max_tokens: int):
        self.model, self.tokenizer, self.name, self.engine = model, tokenizer, model_name, engine
        self.api_key, self.default_max_tokens = api_key, default_max_tokens
        self.faults = _Faults(faults) if faults is not None and faults.rate > 0 else None
        self.created = int(time.time())

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return _error(401, "invalid API key")
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "distill",
             "max_model_len": self.engine.max_positions}]})

    async def chat(self, request: Request) -> Response:
        if not self.authorized(request):
            return _error(401, "invalid API key")
        body = await request.body()  # read first: a hang then sees the client leave
        if self.faults is not None and (fault := await self.faults.apply(request)) is not None:
            return fault
        try:
            req = _parse(body)
            job = self._job(req)
        except _BadRequest as e:
            return _error(e.status, str(e))
        self.engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        if req.stream:
            return StreamingResponse(self._events(req, job, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            completions = await job.result
        except Exception as e:
            return _error(500, f"generation failed: {e}")
        return JSONResponse(self._answer(req, job, meta, completions))

    # -- request -> job

    def _job(self, req: ChatRequest) -> _Job:
        if req.model and req.model != self.name:
            raise _BadRequest(f"model {req.model!r} does not exist; this server has {self.name!r}",
                              404)
        messages = [m.as_dict() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      **(req.chat_template_kwargs or {}))
        except DistillError as e:
            raise _BadRequest(f"messages: {e}") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        room = self.engine.max_positions - len(ids)
        wanted = req.max_completion_tokens or req.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise _BadRequest(f"this model's context is {self.engine.max_positions} tokens; the "
                              f"prompt has {len(ids)} and max_tokens asks for {wanted or 1} more")
        greedy = req.temperature == 0
        k = max(req.top_logprobs or 0, 1) if req.logprobs else 0
        key = (req.temperature, 1.0 if greedy else req.top_p, 0 if greedy else max(req.top_k, 0),
               req.stops(), k)
        loop = asyncio.get_running_loop()
        return _Job(ids=ids, n=req.n, max_tokens=wanted or min(self.default_max_tokens, room),
                    key=key, seed=req.seed, opened=text.rstrip().endswith(THINK_OPEN),
                    stream=req.stream, loop=loop, result=loop.create_future(),
                    events=asyncio.Queue() if req.stream else None)

    # -- answers

    def _message(self, job: _Job, c: Completion) -> dict:
        reasoning, content = split_reasoning(c.text, job.opened)
        return {"role": "assistant", "content": content, "reasoning_content": reasoning}

    def _choice_logprobs(self, req: ChatRequest, c: Completion) -> dict | None:
        if not req.logprobs:
            return None
        k = req.top_logprobs or 0

        def entry(token_id: int, logprob: float) -> dict:
            piece = self.tokenizer.decode([token_id])
            token = f"token_id:{token_id}" if req.return_tokens_as_token_ids else piece
            return {"token": token, "logprob": max(float(logprob), MIN_LOGPROB),
                    "bytes": list(piece.encode())}

        return {"content": [
            {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in zip(ids[:k], lps[:k],
                                                                         strict=True)]}
            for t, lp, ids, lps in zip(c.token_ids, c.token_logprobs, c.top_ids, c.top_logprobs,
                                       strict=True)]}

    def _usage(self, job: _Job, completions: list[Completion]) -> dict:
        done = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": len(job.ids), "completion_tokens": done,
                "total_tokens": len(job.ids) + done}

    def _answer(self, req, job, meta, completions) -> dict:
        choices = [{"index": i, "message": self._message(job, c), "finish_reason": c.finish_reason,
                    "logprobs": self._choice_logprobs(req, c)} for i, c in enumerate(completions)]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": self._usage(job, completions)}

    async def _events(self, req: ChatRequest, job: _Job, meta: dict):
        """The SSE stream: a role chunk per choice, text deltas, a finish chunk per choice, an
        optional usage chunk, then [DONE]."""

        def event(choices, **extra) -> str:
            chunk = {**meta, "object": "chat.completion.chunk", "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        def choice(i, delta, finish=None, logprobs=None) -> dict:
            return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}

        for i in range(job.n):
            yield event([choice(i, {"role": "assistant", "content": ""})])
        while not (job.result.done() and job.events.empty()):
            getter = asyncio.ensure_future(job.events.get())
            await asyncio.wait([getter, job.result], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            _, i, delta = getter.result()
            yield event([choice(i, delta)])
        if job.result.exception() is not None:
            error = {"message": f"generation failed: {job.result.exception()}", "code": 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        completions = job.result.result()
        for i, c in enumerate(completions):
            yield event([choice(i, {}, c.finish_reason, self._choice_logprobs(req, c))])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield event([], usage=self._usage(job, completions))
        yield "data: [DONE]\n\n"


def build_app(model, tokenizer, model_name: str, *, max_batch: int = 16,
              batch_wait_ms: float = 10.0, api_key: str | None = None,
              faults: FaultConfig | None = None, default_max_tokens: int = 1024) -> Starlette:
    """The OpenAI-compatible app over a loaded (model, tokenizer).

    max_batch: most choices per generate call; batch_wait_ms: how long a round waits for more
    requests before it starts; api_key: required as `Authorization: Bearer KEY` when set;
    default_max_tokens: the budget of a request without max_tokens (capped by the context).
    `app.state.engine` is the BatchEngine (counters, `paused()`); `app.state.faults` counts the
    faults injected by kind. The engine's worker runs while the app's lifespan does.
    """
    if tokenizer is None or not tokenizer.chat_template:
        raise DistillError(f"{model_name}: `distill serve` needs a tokenizer with a chat template")
    engine = BatchEngine(model, tokenizer, max_batch, batch_wait_ms)
    server = _Server(model, tokenizer, model_name, engine, api_key, faults, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    app = Starlette(routes=[Route("/v1/chat/completions", server.chat, methods=["POST"]),
                            Route("/v1/models", server.models, methods=["GET"])],
                    lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.engine = engine
    app.state.faults = server.faults.injected if server.faults is not None else Counter()
    return app


# ---------------------------------------------------------------------------------------------
# Running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: a free one), or a one-line DistillError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DistillError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn(app, **kw):
    import uvicorn

    # h11: the protocol _DropConnection relies on (and the same everywhere)
    return uvicorn.Server(uvicorn.Config(app, http="h11", lifespan="on", log_level="warning", **kw))


class ServerThread:
    """Serve an ASGI app (e.g. `build_app(...)`) from a background thread, for tests and notebooks.

        with ServerThread(app) as base_url:      # "http://127.0.0.1:PORT", a free port
            httpx.post(f"{base_url}/v1/chat/completions", json={...})

    `base_url` has no "/v1"; the OpenAI SDK wants `base_url + "/v1"`. Leaving the block stops the
    server (requests still hanging are cut after `graceful_s`) and its batching worker.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 1.0):
        self.app, self.host, self.port, self.graceful_s = app, host, port, graceful_s
        self.base_url: str | None = None
        self._server = self._thread = None

    def start(self) -> str:
        sock = bind_socket(self.host, self.port)
        self.base_url = _url(sock)
        self._server = _uvicorn(self.app, timeout_graceful_shutdown=self.graceful_s)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="distill-serve", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise DistillError(f"the server at {self.base_url} failed to start")
            time.sleep(0.01)
        return self.base_url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join()
            self._server = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          dtype: str = "float32", max_batch: int = 16, batch_wait_ms: float = 10.0,
          default_max_tokens: int = 1024, api_key_env: str | None = None,
          faults: FaultConfig | None = None, echo=print) -> None:
    """Load MODEL and serve it until interrupted. The port is taken before the (slow) load, so a
    busy one fails at once; `echo` receives the line that says where the server listens."""
    from distill.pretrained import load_pretrained

    api_key = read_api_key(api_key_env, "clients must send") if api_key_env else None
    sock = bind_socket(host, port)
    model, tokenizer = load_pretrained(model_path, param_dtype=dtype)
    name = model_name or str(model_path).rstrip("/")
    app = build_app(model, tokenizer, name, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                    api_key=api_key, faults=faults, default_max_tokens=default_max_tokens)
    echo(f"serving {name!r} at {_url(sock)}/v1 (chat/completions, models); Ctrl-C stops it")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: listening on {host} without an API key (see --api-key-env)")
    _uvicorn(app).run(sockets=[sock])
