"""The server's endpoints over a loaded model (`build_app`), and running them: `serve` for
`distill serve`, `ServerThread` for tests and notebooks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from distill.chat import THINK_OPEN, split_reasoning
from distill.config import read_api_key
from distill.errors import DistillError
from distill.pretrained import load_pretrained
from distill.sampling import Completion
from distill.serve.engine import BatchEngine, Job
from distill.serve.protocol import (
    MIN_LOGPROB,
    BadRequest,
    ChatRequest,
    error_response,
    parse_request,
)

# ---------------------------------------------------------------------------------------------
# The app

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is there


class _JobStream(StreamingResponse):
    """A job's SSE response; a client that leaves mid-stream (Starlette stops the stream when it
    hears the disconnect) cancels the job, which frees its batch slot."""

    def __init__(self, job: Job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.result.done():
                self.job.cancelled = True


class _Server:
    """The endpoints' shared state: model, engine, name, key."""

    def __init__(self, model, tokenizer, model_name: str, engine: BatchEngine, api_key: str | None,
                 default_max_tokens: int):
        self.model, self.tokenizer, self.name, self.engine = model, tokenizer, model_name, engine
        self.api_key, self.default_max_tokens = api_key, default_max_tokens
        self.created = int(time.time())

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode())

    async def models(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_response(401, "invalid API key")
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "distill",
             "max_model_len": self.engine.max_positions}]})

    async def chat(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_response(401, "invalid API key")
        body = await request.body()
        try:
            req = parse_request(body)
            job = self._job(req)
        except BadRequest as e:
            return error_response(e.status, str(e))
        self.engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        if req.stream:
            return _JobStream(job, self._events(req, job, meta), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache"})
        while not job.result.done():  # a client that leaves frees its batch slot
            await asyncio.wait([job.result], timeout=DISCONNECT_POLL_S)
            if not job.result.done() and await request.is_disconnected():
                job.cancelled = True
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        try:
            completions = job.result.result()
        except Exception as e:
            return error_response(500, f"generation failed: {e}")
        return JSONResponse(self._answer(req, job, meta, completions))

    # -- request -> job

    def _job(self, req: ChatRequest) -> Job:
        if req.model and req.model != self.name:
            raise BadRequest(f"model {req.model!r} does not exist; this server has {self.name!r}",
                              404)
        messages = [m.as_dict() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      **(req.chat_template_kwargs or {}))
        except DistillError as e:
            raise BadRequest(f"messages: {e}") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        room = self.engine.max_positions - len(ids)
        wanted = req.max_completion_tokens or req.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise BadRequest(f"this model's context is {self.engine.max_positions} tokens; the "
                              f"prompt has {len(ids)} and max_tokens asks for {wanted or 1} more")
        greedy = req.temperature == 0
        k = max(req.top_logprobs or 0, 1) if req.logprobs else 0
        key = (req.temperature, 1.0 if greedy else req.top_p, 0 if greedy else max(req.top_k, 0),
               req.stops(), k)
        loop = asyncio.get_running_loop()
        return Job(ids=ids, n=req.n, max_tokens=wanted or min(self.default_max_tokens, room),
                    key=key, seed=req.seed, opened=text.rstrip().endswith(THINK_OPEN),
                    stream=req.stream, loop=loop, result=loop.create_future(),
                    events=asyncio.Queue() if req.stream else None)

    # -- answers

    def _message(self, job: Job, c: Completion) -> dict:
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

    def _usage(self, job: Job, completions: list[Completion]) -> dict:
        done = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": len(job.ids), "completion_tokens": done,
                "total_tokens": len(job.ids) + done}

    def _answer(self, req, job, meta, completions) -> dict:
        choices = [{"index": i, "message": self._message(job, c), "finish_reason": c.finish_reason,
                    "logprobs": self._choice_logprobs(req, c)} for i, c in enumerate(completions)]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": self._usage(job, completions)}

    async def _events(self, req: ChatRequest, job: Job, meta: dict):
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
            try:
                await asyncio.wait([getter, job.result], return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the client leaves while this waits
                got = getter.done()
                if not got:
                    getter.cancel()
            if not got:
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
              default_max_tokens: int = 1024) -> Starlette:
    """The OpenAI-compatible app over a loaded (model, tokenizer).

    max_batch: most choices per generate call; batch_wait_ms: how long a round waits for more
    requests before it starts; api_key: required as `Authorization: Bearer KEY` when set;
    default_max_tokens: the budget of a request without max_tokens (capped by the context).
    `app.state.engine` is the BatchEngine (counters, `paused()`). The engine's worker runs while
    the app's lifespan does.
    """
    if tokenizer is None or not tokenizer.chat_template:
        raise DistillError(f"{model_name}: `distill serve` needs a tokenizer with a chat template")
    engine = BatchEngine(model, tokenizer, max_batch, batch_wait_ms)
    server = _Server(model, tokenizer, model_name, engine, api_key, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    app = Starlette(routes=[Route("/v1/chat/completions", server.chat, methods=["POST"]),
                            Route("/v1/models", server.models, methods=["GET"])],
                    lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.engine = engine
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
    # h11 everywhere (tests/faults.py drops connections the way h11 allows)
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
          default_max_tokens: int = 1024, api_key_env: str | None = None, echo=print) -> None:
    """Load MODEL and serve it until interrupted. The port is taken before the (slow) load, so a
    busy one fails at once; `echo` receives the line that says where the server listens."""
    api_key = read_api_key(api_key_env, "clients must send") if api_key_env else None
    sock = bind_socket(host, port)
    model, tokenizer = load_pretrained(model_path, param_dtype=dtype)
    name = model_name or str(model_path).rstrip("/")
    app = build_app(model, tokenizer, name, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                    api_key=api_key, default_max_tokens=default_max_tokens)
    echo(f"serving {name!r} at {_url(sock)}/v1 (chat/completions, models); Ctrl-C stops it")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: listening on {host} without an API key (see --api-key-env)")
    _uvicorn(app).run(sockets=[sock])
