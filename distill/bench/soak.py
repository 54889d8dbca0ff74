"""`distill bench soak`: `distill serve` under sustained load on the loopback interface, beside
the same load on the inference engine in process.

The server runs as its own process (`python -m distill.cli serve MODEL`) so that its resident
memory is its own; a bounded load generator (`concurrency` clients, each one request at a time,
until the deadline) sends chat requests of varied prompts and budgets, plain and streaming, each
client with its own temperature and top-p (as real clients are), and every `disconnect_every`-th
streaming client hangs up after its first text delta (a client that leaves: not a failure, its
slot is freed). Reported: requests done and failed, p50 / p99 latency of the completed ones, p50 /
p99 time to first token of the streaming ones, completion tokens per second, the server's RSS
after the warm-up and at the end (sampled every `rss_every_s`), and, measured first in the same
run, the standalone engine's tokens per second on the same requests and slots
(`soak_baseline`): the ratio is what serving over HTTP costs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.sampling import SamplingParams


@dataclass(frozen=True)
class SoakConfig:
    """The load and the server's engine. max_len: the engine's tokens per request (prompts here
    are short; a small one keeps the warm-up short); warmup: compile every program first (the
    server's and the standalone engine's); baseline_s: how long the standalone engine runs."""

    seconds: float = 600.0
    concurrency: int = 64
    max_tokens: int = 64
    warmup_s: float = 60.0  # RSS growth is measured from this point of the load on
    disconnect_every: int = 20
    slots: int = 16
    max_len: int = 256
    warmup: bool = True
    baseline_s: float = 60.0
    rss_every_s: float = 5.0
    seed: int = 0


@dataclass(frozen=True)
class Ask:
    """One request of the load, the same for the server (`body`) and the engine (`params`)."""

    i: int
    question: str
    temperature: float
    top_p: float
    max_tokens: int
    stream: bool
    leave: bool  # hang up after the first text delta

    def params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.i)

    def body(self) -> dict:
        body = {"model": "soak", "seed": self.i, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": self.question}]}
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body


class Asks:
    """The load's requests, numbered: varied prompts and budgets, each client its own sampling
    settings (temperature 0.1-1.0, top-p 0.8-1.0)."""

    def __init__(self, cfg: SoakConfig):
        self.cfg, self.rng, self.n = cfg, random.Random(cfg.seed), 0
        self.settings = [(round(self.rng.uniform(0.1, 1.0), 2), round(self.rng.uniform(0.8, 1.0), 2))
                         for _ in range(cfg.concurrency)]

    def next(self, client: int) -> Ask:
        self.n += 1
        i, every = self.n, self.cfg.disconnect_every
        stream = i % 2 == 0
        temperature, top_p = self.settings[client]
        return Ask(i, f"Start with {i}. Add {i % 7}, then multiply by 2. What is the result?",
                   temperature, top_p,
                   self.rng.randint(max(1, self.cfg.max_tokens // 4), self.cfg.max_tokens),
                   stream, stream and every > 0 and (i // 2) % every == 0)


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


@dataclass
class SoakResult:
    seconds: float
    concurrency: int
    requests_ok: int = 0
    requests_failed: int = 0
    disconnected: int = 0  # clients that left on purpose
    completion_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    ttft_s: list[float] = field(default_factory=list, repr=False)  # streaming: the first text
    rss_mb: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (t, MB)
    warmup_s: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failures, in words

    def summary(self) -> dict:
        lat = self.latencies_s
        after = [mb for t, mb in self.rss_mb if t >= self.warmup_s] or [0.0]
        return {"seconds": self.seconds, "concurrency": self.concurrency,
                "requests_ok": self.requests_ok, "requests_failed": self.requests_failed,
                "disconnected": self.disconnected,
                "p50_s": _pct(lat, 0.50), "p99_s": _pct(lat, 0.99),
                "mean_s": statistics.fmean(lat) if lat else float("nan"),
                "ttft_p50_s": _pct(self.ttft_s, 0.50), "ttft_p99_s": _pct(self.ttft_s, 0.99),
                "completion_tokens_per_s": self.completion_tokens / self.seconds,
                "rss_start_mb": self.rss_mb[0][1] if self.rss_mb else 0.0,
                "rss_after_warmup_mb": after[0], "rss_end_mb": after[-1],
                "rss_max_after_warmup_mb": max(after), "errors": self.errors[:5]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class _Load:
    """The clients: each sends one request at a time until the deadline."""

    def __init__(self, url: str, result: SoakResult, asks: Asks):
        self.url, self.result, self.asks = url, result, asks

    async def client(self, http, index: int, deadline: float) -> None:
        while time.perf_counter() < deadline:
            ask = self.asks.next(index)
            t = time.perf_counter()
            try:
                tokens = await (self._stream(http, ask, t) if ask.stream
                                else self._plain(http, ask))
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever it is
                self.result.requests_failed += 1
                self.result.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            if tokens is None:
                self.result.disconnected += 1
                continue
            self.result.requests_ok += 1
            self.result.completion_tokens += tokens
            self.result.latencies_s.append(time.perf_counter() - t)

    async def _plain(self, http, ask: Ask) -> int:
        r = await http.post(f"{self.url}/chat/completions", json=ask.body())
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return int(r.json()["usage"]["completion_tokens"])

    async def _stream(self, http, ask: Ask, sent: float) -> int | None:
        async with http.stream("POST", f"{self.url}/chat/completions", json=ask.body()) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            usage, done, first = None, False, True
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                choices = chunk.get("choices")
                if first and choices and "role" not in choices[0]["delta"]:
                    first = False  # the first text (or the finish chunk of an empty answer)
                    self.result.ttft_s.append(time.perf_counter() - sent)
                    if ask.leave:
                        return None  # hang up after the first text delta
                usage = chunk.get("usage") or usage
            if not done or usage is None:
                raise RuntimeError("the stream ended without [DONE] and usage")
            return int(usage["completion_tokens"])


def _server_command(model_path, port: int, cfg: SoakConfig) -> list[str]:
    return [sys.executable, "-m", "distill.cli", "serve", str(model_path), "--port", str(port),
            "--model-name", "soak", "--slots", str(cfg.slots), "--max-len", str(cfg.max_len),
            *([] if cfg.warmup else ["--no-warmup"])]


def run_soak(model_path: str | Path, cfg: SoakConfig | None = None,
             echo: Callable[[str], None] = print) -> dict:
    """The standalone engine on the load's requests (in this process), then `model_path`
    served in a child process under the load for `cfg.seconds`: the summary of both."""
    from distill.bench.soak_baseline import run_standalone

    cfg = cfg or SoakConfig()
    standalone = run_standalone(model_path, cfg, echo)
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    server = subprocess.Popen(_server_command(model_path, port, cfg), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.perf_counter()
        _wait_for_server(url, server)
        echo(f"soak: the server answered after {time.perf_counter() - started:.0f} s (warm-up "
             f"{'on' if cfg.warmup else 'off'})")
        result = SoakResult(seconds=cfg.seconds, concurrency=cfg.concurrency,
                            warmup_s=cfg.warmup_s)
        echo(f"soak: {cfg.concurrency} clients for {cfg.seconds:.0f} s against {url} "
             f"(server pid {server.pid})")
        asyncio.run(_drive(_Load(url, result, Asks(cfg)), server.pid, cfg, echo))
        if server.poll() is not None:
            raise DistillError(f"the server exited during the soak (code {server.returncode})")
        summary = {**result.summary(), "slots": cfg.slots, "max_len": cfg.max_len, **standalone}
        summary["ratio_to_standalone"] = (summary["completion_tokens_per_s"]
                                          / standalone["standalone_tokens_per_s"])
        return summary
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


async def _drive(load: _Load, pid: int, cfg: SoakConfig, echo) -> None:
    """Run the clients to the deadline, sampling the server's RSS and reporting each minute."""
    import httpx

    result = load.result
    limits = httpx.Limits(max_connections=cfg.concurrency,
                          max_keepalive_connections=cfg.concurrency)
    timeout = httpx.Timeout(300.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        start = time.perf_counter()
        deadline = start + cfg.seconds
        clients = [asyncio.create_task(load.client(http, i, deadline))
                   for i in range(cfg.concurrency)]
        next_report = start
        while not all(c.done() for c in clients):
            now = time.perf_counter()
            result.rss_mb.append((now - start, _rss_mb(pid)))
            if now >= next_report:
                echo(f"  t={now - start:5.0f} s  ok {result.requests_ok}  failed "
                     f"{result.requests_failed}  left {result.disconnected}  "
                     f"rss {result.rss_mb[-1][1]:.0f} MB")
                next_report += 60
            await asyncio.wait(clients, timeout=cfg.rss_every_s)
        result.seconds = time.perf_counter() - start
        result.rss_mb.append((result.seconds, _rss_mb(pid)))


def _wait_for_server(url: str, server: subprocess.Popen, timeout: float = 1800.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise DistillError(f"the server exited before it answered: {server.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise DistillError(f"{url}: the server did not answer within {timeout:.0f} s")


def soak_table(s: dict) -> str:
    return "\n".join([
        "| requests ok | failed | left on purpose | p50 s | p99 s | TTFT p50 s | TTFT p99 s | "
        "completion tokens/s | standalone tokens/s | ratio | RSS after warm-up MB | RSS end MB | "
        "RSS max MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests_ok']} | {s['requests_failed']} | {s['disconnected']} | {s['p50_s']:.2f} | "
        f"{s['p99_s']:.2f} | {s['ttft_p50_s']:.2f} | {s['ttft_p99_s']:.2f} | "
        f"{s['completion_tokens_per_s']:.1f} | {s['standalone_tokens_per_s']:.1f} | "
        f"{s['ratio_to_standalone']:.2f} | {s['rss_after_warmup_mb']:.0f} | "
        f"{s['rss_end_mb']:.0f} | {s['rss_max_after_warmup_mb']:.0f} |",
        f"({s['seconds']:.0f} s, {s['concurrency']} clients, {s['slots']} slots; standalone: the "
        f"engine in process on the same requests for {s['standalone_seconds']:.0f} s; RSS at "
        f"start {s['rss_start_mb']:.0f} MB)"])


def write_json(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")

