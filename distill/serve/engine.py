"""The batching engine: one worker thread runs every waiting request with compatible sampling
settings through one `distill.sampling.generate` call, streaming deltas as decoding proceeds."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import threading
import time
import zlib

from distill.sampling import Completion, DecodeModel, SamplingParams, generate, stop_ids
from distill.serve.protocol import StreamText

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The batching engine


@dataclasses.dataclass
class Job:
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
    cancelled: bool = False  # the client left: not run if still queued, its rows end if running

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
    its own `max_tokens`. A cancelled job (its client gone) is dropped from the queue, or its rows
    end at the next chunk of the round it is in (as do the padding rows from the start), so a
    round lasts only as long as someone waits for it. `generate_calls`, `jobs_done`,
    `jobs_cancelled` and `tokens_generated` (the choices' tokens) count what it did.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, batch_wait_ms: float = 10.0):
        self.model, self.tokenizer = model, tokenizer
        self.decoder = DecodeModel(model)  # prepared once for every batch
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.eos_ids = stop_ids(model, tokenizer)
        self.max_positions = model.config.max_position_embeddings
        self.generate_calls = self.jobs_done = self.jobs_cancelled = self.tokens_generated = 0
        self._queue: list[Job] = []
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

    def submit(self, job: Job) -> None:
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
                if not group:
                    continue
                try:
                    self._run_group(group)
                except Exception as e:  # a failed round fails its requests, not the server
                    log.exception("generation failed")
                    for job in group:
                        job.post(_settle, job.result, e)

    def _take_group(self) -> list[Job]:
        with self._cond:
            for job in self._queue:
                if job.cancelled:
                    self.jobs_cancelled += 1
                    job.post(job.result.cancel)
            self._queue = [job for job in self._queue if not job.cancelled]
            if not self._queue:
                return []
            first, group, rest, rows = self._queue[0], [], [], 0
            for job in self._queue:
                if job.key == first.key and (not group or rows + job.n <= self.max_batch):
                    group.append(job)
                    rows += job.n
                else:
                    rest.append(job)
            self._queue = rest
        return group

    def _params(self, group: list[Job]) -> SamplingParams:
        temperature, top_p, top_k, stop, k = group[0].key
        longest = max(len(job.ids) for job in group)
        budget = min(max(_next_pow2(max(job.max_tokens for job in group)), 16),
                     self.max_positions - longest)
        return SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=self._seed(group), stop=stop, logprobs=k)

    def _seed(self, group: list[Job]) -> int:
        seeds = [job.seed for job in group]
        if any(s is None for s in seeds):
            return self._rng.randrange(2**31)
        if len(seeds) == 1:
            return seeds[0] & 0x7FFFFFFF
        return zlib.crc32(json.dumps(seeds).encode()) & 0x7FFFFFFF

    def _run_group(self, group: list[Job]) -> None:
        rows = [(job, c) for job in group for c in range(job.n)]
        prompts = [job.ids for job, _ in rows]
        size = min(_next_pow2(len(rows)), max(self.max_batch, len(rows)))
        prompts += [prompts[-1]] * (size - len(rows))  # padding rows, dropped below
        params = self._params(group)
        hook = _ChunkHook(rows, size, self.tokenizer, set(self.eos_ids), params.stop)
        completions = generate(self.decoder, prompts, params, self.eos_ids, self.tokenizer,
                               pad_id=self.tokenizer.pad_token_id or 0, on_chunk=hook)
        self.generate_calls += 1
        for job in group:
            mine = [self._cut(c, job.max_tokens, params.stop)
                    for (owner, _), c in zip(rows, completions, strict=False) if owner is job]
            self.tokens_generated += sum(len(c.token_ids) for c in mine)
            if job.events is not None:
                for c, delta in enumerate(hook.final_deltas(job, mine)):
                    if delta:
                        job.post(job.events.put_nowait, ("delta", c, delta))
            job.post(_settle, job.result, mine)
            self.jobs_done += 1
            self.jobs_cancelled += job.cancelled

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


class _ChunkHook:
    """generate's on_chunk for a round: decodes each streaming choice's text so far and posts its
    deltas to the job's event queue, and ends the rows of cancelled jobs and the padding rows."""

    def __init__(self, rows, size: int, tokenizer, eos: set[int], stops):
        self.rows, self.size, self.tokenizer, self.eos = rows, size, tokenizer, eos
        self.ids: list[list[int]] = [[] for _ in rows]
        self.text = {id(job): [StreamText(job.opened, stops) for _ in range(job.n)]
                     for job, _ in rows if job.stream}

    def __call__(self, new_rows: list[list[int]]) -> list[int]:
        self._stream(new_rows)
        return [j for j, (job, _) in enumerate(self.rows) if job.cancelled] + list(
            range(len(self.rows), self.size))

    def _stream(self, new_rows: list[list[int]]) -> None:
        for j, (job, c) in enumerate(self.rows):
            if not job.stream or not new_rows[j] or job.cancelled:
                continue
            ids = self.ids[j]
            ids += new_rows[j]
            kept = [t for t in ids[: job.max_tokens + 1] if t not in self.eos][: job.max_tokens]
            delta = self.text[id(job)][c].update(self.tokenizer.decode(kept))
            if delta:
                job.post(job.events.put_nowait, ("delta", c, delta))

    def final_deltas(self, job: Job, completions: list[Completion]) -> list[dict]:
        """The last delta of each of the job's choices, from its final text."""
        return [self.text[id(job)][i].update(c.text, final=True) for i, c in enumerate(completions)]


