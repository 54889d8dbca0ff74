"""The server's endpoints over a loaded model (`build_app`), and running them: `serve` for
`distill serve`, `ServerThread` for tests and notebooks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
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
from distill.inference import Completion, EngineConfig, EngineError
from distill.pretrained import load_pretrained
from distill.sampling import SamplingParams
from distill.serve.completions import PromptScorer
from distill.serve.jobs import Job, Jobs
from distill.serve.protocol import (
    MIN_LOGPROB,
    BadRequest,
    ChatRequest,
    CompletionRequest,
    error_response,
    parse_request,
)

# ---------------------------------------------------------------------------------------------
# The app

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is there


class _JobStream(StreamingResponse):
    """A job's SSE response; a client that leaves mid-stream (Starlette stops the stream when it
    hears the disconnect) cancels the job, which frees its engine slots."""

    def __init__(self, job: Job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.result.done():
                self.job.cancel()


class _Server:
    """The endpoints' shared state: tokenizer, jobs (the engine), prompt scorer, name, key."""

    def __init__(self, tokenizer, model_name: str, jobs: Jobs, api_key: str | None,
                 default_max_tokens: int, scorer: PromptScorer):
        self.tokenizer, self.name, self.jobs, self.scorer = tokenizer, model_name, jobs, scorer
        self.api_key, self.default_max_tokens = api_key, default_max_tokens
        self.created = int(time.time())
        self._rng = random.Random()  # seeds for requests without one

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
             "max_model_len": self.jobs.max_len}]})

    async def chat(self, request: Request) -> Response:
        if not self.authorized(request):
            return error_response(401, "invalid API key")
        body = await request.body()
        try:
            req = parse_request(body)
            job = self._job(req)
            self.jobs.submit(job)
        except BadRequest as e:
            return error_response(e.status, str(e))
        except EngineError as e:  # too long for the engine's slots, n past them, ...
            return error_response(400, str(e))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        if req.stream:
            return _JobStream(job, self._events(req, job, meta), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache"})
        completions = await self._finish(job, request)
        if isinstance(completions, Response):
            return completions
        return JSONResponse(self._answer(req, job, meta, completions))

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions (vLLM's shape): the prompt as text or token ids, sampled through
        the engine; `prompt_logprobs` scored beside it on the serving model."""
        if not self.authorized(request):
            return error_response(401, "invalid API key")
        body = await request.body()
        try:
            req = parse_request(body, CompletionRequest)
            ids = self._completion_ids(req)
            loop = asyncio.get_running_loop()
            params = self._params(req, len(ids), req.max_tokens,
                                  0 if req.logprobs is None else max(req.logprobs, 1))
            job = Job(ids=ids, params=params, opened=False, loop=loop,
                      result=loop.create_future())
            self.jobs.submit(job)
        except BadRequest as e:
            return error_response(e.status, str(e))
        except EngineError as e:
            return error_response(400, str(e))
        scored = None if req.prompt_logprobs is None else asyncio.ensure_future(
            asyncio.to_thread(self.scorer.prompt_logprobs, ids, req.prompt_logprobs))
        completions = await self._finish(job, request)
        if isinstance(completions, Response):
            return completions
        try:
            prompt_logprobs = None if scored is None else await scored
        except Exception as e:
            return error_response(500, f"scoring the prompt failed: {e}")
        return JSONResponse(self._text_answer(req, job, completions, prompt_logprobs))

    async def _finish(self, job: Job, request: Request) -> list[Completion] | Response:
        """The job's completions once done; 499 when the client leaves (which frees its engine
        slots), 500 when generation failed."""
        while not job.result.done():
            await asyncio.wait([job.result], timeout=DISCONNECT_POLL_S)
            if not job.result.done() and await request.is_disconnected():
                job.cancel()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        try:
            return job.result.result()
        except Exception as e:
            return error_response(500, f"generation failed: {e}")

    # -- request -> job

    def _check_model(self, model: str | None) -> None:
        if model and model != self.name:
            raise BadRequest(f"model {model!r} does not exist; this server has {self.name!r}", 404)

    def _job(self, req: ChatRequest) -> Job:
        self._check_model(req.model)
        messages = [m.as_dict() for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                      **(req.chat_template_kwargs or {}))
        except DistillError as e:
            raise BadRequest(f"messages: {e}") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        loop = asyncio.get_running_loop()
        params = self._params(req, len(ids), req.max_completion_tokens or req.max_tokens,
                              max(req.top_logprobs or 0, 1) if req.logprobs else 0)
        return Job(ids=ids, params=params, opened=text.rstrip().endswith(THINK_OPEN), loop=loop,
                   result=loop.create_future(), events=asyncio.Queue() if req.stream else None)

    def _completion_ids(self, req: CompletionRequest) -> list[int]:
        """A completions request's prompt ids: its text tokenized, or its ids checked."""
        self._check_model(req.model)
        if req.stream:
            raise BadRequest("stream: not supported on /v1/completions (use chat/completions)")
        vocab = self.scorer.model.config.vocab_size
        if req.prompt_logprobs is not None and req.prompt_logprobs > vocab:
            raise BadRequest(f"prompt_logprobs: at most the vocabulary ({vocab}), or -1 for all")
        if isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = list(req.prompt)
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise BadRequest(f"prompt: token id {bad} is outside the vocabulary ({vocab} ids)")
        if not ids:
            raise BadRequest("prompt: empty")
        return ids

    def _params(self, req: ChatRequest | CompletionRequest, prompt_tokens: int,
                wanted: int | None, logprobs: int) -> SamplingParams:
        """The request's own settings (`wanted` new tokens, `logprobs` top entries kept); the
        engine rejects what does not fit its slots."""
        room = self.jobs.max_len - prompt_tokens
        greedy = req.temperature == 0
        seed = self._rng.randrange(2**31) if req.seed is None else req.seed & 0x7FFFFFFF
        return SamplingParams(
            max_new_tokens=wanted or max(1, min(self.default_max_tokens, room)),
            temperature=req.temperature, top_p=1.0 if greedy else req.top_p,
            top_k=0 if greedy else max(req.top_k, 0), n=req.n, seed=seed, stop=req.stops(),
            logprobs=logprobs)

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

    def _text_answer(self, req: CompletionRequest, job: Job, completions: list[Completion],
                     prompt_logprobs: list | None) -> dict:
        """A /v1/completions answer in vLLM's shape (every choice carries the prompt's scores)."""
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                    "stop_reason": None, "prompt_logprobs": prompt_logprobs,
                    "logprobs": None if req.logprobs is None else self.scorer.completion_logprobs(
                        c, req.logprobs, req.return_tokens_as_token_ids)}
                   for i, c in enumerate(completions)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.name, "choices": choices,
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


def build_app(model, tokenizer, model_name: str, *, config: EngineConfig | None = None,
              api_key: str | None = None, default_max_tokens: int = 1024) -> Starlette:
    """The OpenAI-compatible app over a loaded (model, tokenizer).

    config: the inference engine's shape (slots, max_len: prompt plus completion tokens per
    request, ...); api_key: required as `Authorization: Bearer KEY` when set;
    default_max_tokens: the budget of a request without max_tokens (capped by max_len).
    `app.state.jobs` is the server's `Jobs` (counters; `.engine` the inference engine, which
    compiles its programs as requests first need them unless `jobs.warmup()` ran). The engine's
    worker thread runs while the app's lifespan does.
    """
    if tokenizer is None or not tokenizer.chat_template:
        raise DistillError(f"{model_name}: `distill serve` needs a tokenizer with a chat template")
    jobs = Jobs(model, tokenizer, config)
    server = _Server(tokenizer, model_name, jobs, api_key, default_max_tokens,
                     PromptScorer(model, tokenizer))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        jobs.start()
        try:
            yield
        finally:
            jobs.stop()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    app = Starlette(routes=[Route("/v1/chat/completions", server.chat, methods=["POST"]),
                            Route("/v1/completions", server.completions, methods=["POST"]),
                            Route("/v1/models", server.models, methods=["GET"])],
                    lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.jobs = jobs
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
    server (requests still hanging are cut after `graceful_s`) and its engine's worker.
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
          dtype: str = "float32", config: EngineConfig | None = None, warmup: bool = True,
          default_max_tokens: int = 1024, api_key_env: str | None = None, echo=print) -> None:
    """Load MODEL and serve it until interrupted. The port is taken before the (slow) load, so a
    busy one fails at once; with `warmup` every engine program is compiled before the first
    request. `echo` receives the lines that say where the server listens."""
    api_key = read_api_key(api_key_env, "clients must send") if api_key_env else None
    sock = bind_socket(host, port)
    model, tokenizer = load_pretrained(model_path, param_dtype=dtype)
    name = model_name or str(model_path).rstrip("/")
    app = build_app(model, tokenizer, name, config=config, api_key=api_key,
                    default_max_tokens=default_max_tokens)
    jobs = app.state.jobs
    if warmup:
        programs, seconds = jobs.warmup()
        echo(f"warm-up: {programs} engine programs compiled in {seconds:.1f} s")
    echo(f"serving {name!r} at {_url(sock)}/v1 (chat/completions, completions, models; "
         f"{jobs.engine.config.slots} slots of {jobs.max_len} tokens); Ctrl-C stops it")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: listening on {host} without an API key (see --api-key-env)")
    _uvicorn(app).run(sockets=[sock])
