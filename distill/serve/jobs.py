"""Chat requests on the inference engine: each request is one `Engine.submit` with its own
sampling settings; its text deltas are posted to the request's event loop as its slots produce
them, and a client that leaves cancels it (its slots free at the next host visit)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from functools import partial

from distill.inference import Engine, EngineConfig, Request
from distill.sampling import SamplingParams
from distill.serve.protocol import StreamText


@dataclasses.dataclass
class Job:
    """One chat request: its prompt ids and settings, and where its results go (an asyncio
    future and, when streaming, a queue of ("delta", choice, delta) items)."""

    ids: list[int]  # the rendered prompt's token ids
    params: SamplingParams  # seed resolved: every job has one
    opened: bool  # the prompt ends inside a think block
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future  # list[Completion] (one per choice) or an exception
    events: asyncio.Queue | None = None  # streaming only
    request: Request | None = None  # the engine's, once submitted
    texts: list[StreamText] = dataclasses.field(default_factory=list)  # streamed text per choice

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def stream(self) -> bool:
        return self.events is not None

    def post(self, fn, *args) -> None:
        """Run `fn(*args)` on the request's event loop (from the engine's thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(fn, *args)

    def cancel(self) -> None:
        """The client left: the engine drops the request, or ends its samples at its next visit."""
        if self.request is not None:
            self.request.cancel()


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        (future.set_exception if isinstance(value, BaseException) else future.set_result)(value)


class Jobs:
    """The server's side of the engine: submits jobs, streams their deltas, settles their
    futures, and counts `requests_done`, `requests_cancelled` and `tokens_generated` (the
    choices' completion tokens, those of cancelled requests included)."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, config)
        self._eos = set(self.engine.eos_ids)
        self.requests_done = self.requests_cancelled = self.tokens_generated = 0

    @property
    def max_len(self) -> int:
        """Prompt plus completion tokens a request may use."""
        return self.engine.max_len

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def warmup(self) -> tuple[int, float]:
        """Compile every program the engine runs: (their number, seconds)."""
        t = time.perf_counter()
        n = self.engine.warmup()
        return n, time.perf_counter() - t

    def submit(self, job: Job) -> None:
        """Hand `job` to the engine; raises EngineError (one line) for what it cannot serve."""
        if job.stream:
            job.texts = [StreamText(job.opened, job.params.stop) for _ in range(job.n)]
        job.request = self.engine.submit(job.ids, job.params,
                                         partial(self._delta, job) if job.stream else None,
                                         partial(self._done, job))

    # -- on the engine's thread

    def _delta(self, job: Job, req: Request, sample: int, _new: list[int]) -> None:
        ids = req.tokens[sample]
        if ids and ids[-1] in self._eos:  # a sample's last token, never part of its text
            ids = ids[:-1]
        delta = job.texts[sample].update(self.tokenizer.decode(ids))
        if delta:
            job.post(job.events.put_nowait, ("delta", sample, delta))

    def _done(self, job: Job, req: Request) -> None:
        if req.error is not None:
            job.post(_settle, job.result, req.error)
            return
        completions = req.completions
        self.requests_cancelled += req.cancelled
        self.requests_done += not req.cancelled
        self.tokens_generated += sum(len(c.token_ids) for c in completions)
        if job.stream and not req.cancelled:
            for i, c in enumerate(completions):
                delta = job.texts[i].update(c.text, final=True)
                if delta:
                    job.post(job.events.put_nowait, ("delta", i, delta))
        job.post(_settle, job.result, completions)
