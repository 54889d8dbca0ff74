"""The soak's baseline: the inference engine in this process, with the server's slots and
max_len, on the soak's requests (the same prompts, budgets and per-client sampling settings),
`concurrency` of them in flight at a time for `baseline_s`: completion tokens per second without
HTTP, streaming or the event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from distill.bench.soak import Asks, SoakConfig
from distill.chat import prompt_ids
from distill.errors import DistillError
from distill.inference import Engine, EngineConfig
from distill.pretrained import load_pretrained


class _ClosedLoop:
    """`concurrency` clients on the engine, each submitting its next request when one ends,
    until the deadline; then the ones in flight finish."""

    def __init__(self, engine: Engine, asks: Asks, tokenizer, concurrency: int):
        self.engine, self.asks, self.tokenizer = engine, asks, tokenizer
        self.concurrency = concurrency
        self.lock, self.finished = threading.Lock(), threading.Event()
        self.tokens = self.requests = self.open = 0
        self.errors: list[str] = []
        self.deadline = 0.0

    def run(self, seconds: float) -> float:
        """Seconds from the first submit to the last completion."""
        start = time.perf_counter()
        self.deadline = start + seconds
        for client in range(self.concurrency):
            self._submit(client)
        self.finished.wait()
        return time.perf_counter() - start

    def _submit(self, client: int) -> None:
        ask = self.asks.next(client)
        with self.lock:
            self.open += 1
        self.engine.submit(prompt_ids(self.tokenizer, ask.question), ask.params(),
                           on_done=partial(self._done, client))

    def _done(self, client: int, req) -> None:
        with self.lock:
            self.open -= 1
            if req.error is not None:
                self.errors.append(str(req.error))
            else:
                self.tokens += sum(len(c.token_ids) for c in req.completions)
                self.requests += 1
        if time.perf_counter() < self.deadline and not self.errors:
            self._submit(client)
        elif self.open == 0:
            self.finished.set()


def run_standalone(model_path: str | Path, cfg: SoakConfig,
                   echo: Callable[[str], None] = print) -> dict:
    """The engine's completion tokens per second on the soak's load (keys `standalone_*`)."""
    model, tokenizer = load_pretrained(model_path)
    engine = Engine(model, tokenizer, EngineConfig(slots=cfg.slots, max_len=cfg.max_len))
    t = time.perf_counter()
    programs = engine.warmup() if cfg.warmup else 0
    warm = time.perf_counter() - t
    if cfg.warmup:
        echo(f"standalone: warm-up compiled {programs} programs in {warm:.0f} s")
    loop = _ClosedLoop(engine, Asks(cfg), tokenizer, cfg.concurrency)
    engine.start()
    try:
        seconds = loop.run(cfg.baseline_s)
    finally:
        engine.stop()
    if loop.errors:
        raise DistillError(f"the standalone engine failed: {loop.errors[0]}")
    out = {"standalone_tokens_per_s": loop.tokens / seconds, "standalone_seconds": seconds,
           "standalone_requests": loop.requests, "standalone_warmup_s": warm,
           "standalone_programs": programs,
           "standalone_utilisation": engine.tokens_delivered / max(engine.slot_steps, 1)}
    echo(f"standalone: {loop.requests} requests, {out['standalone_tokens_per_s']:.1f} "
         f"completion tokens/s over {seconds:.0f} s (utilisation "
         f"{out['standalone_utilisation']:.2f})")
    return out
