"""`distill bench soak`: `distill serve` under sustained load on the loopback interface.

The server runs as its own process (`python -m distill.cli serve MODEL`) so that its resident
memory is its own; a bounded load generator (`concurrency` clients, each one request at a time,
until the deadline) sends chat requests of varied prompts and budgets, plain and streaming, and
every `disconnect_every`-th streaming client hangs up after its first text delta (a client that
leaves: not a failure, its batch slot is freed). Reported: requests done and failed, p50 / p99
latency of the completed ones, completion tokens per second, and the server's RSS after the
warm-up and at the end (sampled every `rss_every_s`).
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


@dataclass
class SoakResult:
    seconds: float
    concurrency: int
    requests_ok: int = 0
    requests_failed: int = 0
    disconnected: int = 0  # clients that left on purpose
    completion_tokens: int = 0
    latencies_s: list[float] = field(default_factory=list, repr=False)
    rss_mb: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (t, MB)
    warmup_s: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failures, in words

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        after = [mb for t, mb in self.rss_mb if t >= self.warmup_s] or [0.0]

        def pct(q: float) -> float:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        return {"seconds": self.seconds, "concurrency": self.concurrency,
                "requests_ok": self.requests_ok, "requests_failed": self.requests_failed,
                "disconnected": self.disconnected,
                "p50_s": pct(0.50), "p99_s": pct(0.99),
                "mean_s": statistics.fmean(lat) if lat else float("nan"),
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

    def __init__(self, url: str, result: SoakResult, max_tokens: int, disconnect_every: int,
                 seed: int):
        self.url, self.result, self.max_tokens = url, result, max_tokens
        self.disconnect_every, self.rng, self.n = disconnect_every, random.Random(seed), 0

    def _body(self) -> tuple[dict, bool]:
        self.n += 1
        i = self.n
        stream = i % 2 == 0
        leave = stream and self.disconnect_every > 0 and (i // 2) % self.disconnect_every == 0
        body = {"model": "soak", "seed": i, "temperature": 0.6, "top_p": 0.95,
                "max_tokens": self.rng.randint(max(1, self.max_tokens // 4), self.max_tokens),
                "messages": [{"role": "user", "content": f"Start with {i}. Add {i % 7}, then "
                                                         "multiply by 2. What is the result?"}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body, leave

    async def client(self, http, deadline: float) -> None:
        while time.perf_counter() < deadline:
            body, leave = self._body()
            t = time.perf_counter()
            try:
                tokens = await (self._stream(http, body, leave) if body.get("stream")
                                else self._plain(http, body))
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

    async def _plain(self, http, body: dict) -> int:
        r = await http.post(f"{self.url}/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return int(r.json()["usage"]["completion_tokens"])

    async def _stream(self, http, body: dict, leave: bool) -> int | None:
        async with http.stream("POST", f"{self.url}/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            usage, done = None, False
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
                if leave and chunk.get("choices") and "role" not in chunk["choices"][0]["delta"]:
                    return None  # hang up after the first text delta
                usage = chunk.get("usage") or usage
            if not done or usage is None:
                raise RuntimeError("the stream ended without [DONE] and usage")
            return int(usage["completion_tokens"])


def run_soak(model_path: str | Path, *, seconds: float = 600.0, concurrency: int = 64,
             max_tokens: int = 64, warmup_s: float = 60.0, disconnect_every: int = 20,
             max_batch: int = 16, rss_every_s: float = 5.0, seed: int = 0,
             echo: Callable[[str], None] = print) -> dict:
    """Serve `model_path` in a child process, load it for `seconds`, return the summary."""
    import httpx

    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    server = subprocess.Popen(
        [sys.executable, "-m", "distill.cli", "serve", str(model_path), "--port", str(port),
         "--model-name", "soak", "--max-batch", str(max_batch)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_for_server(url, server)
        result = SoakResult(seconds=seconds, concurrency=concurrency, warmup_s=warmup_s)
        load = _Load(url, result, max_tokens, disconnect_every, seed)
        echo(f"soak: {concurrency} clients for {seconds:.0f} s against {url} "
             f"(server pid {server.pid})")

        async def main() -> None:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            timeout = httpx.Timeout(300.0, connect=30.0)
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
                start = time.perf_counter()
                deadline = start + seconds
                clients = [asyncio.create_task(load.client(http, deadline))
                           for _ in range(concurrency)]
                next_report = start
                while not all(c.done() for c in clients):
                    now = time.perf_counter()
                    result.rss_mb.append((now - start, _rss_mb(server.pid)))
                    if now >= next_report:
                        echo(f"  t={now - start:5.0f} s  ok {result.requests_ok}  failed "
                             f"{result.requests_failed}  left {result.disconnected}  "
                             f"rss {result.rss_mb[-1][1]:.0f} MB")
                        next_report += 60
                    await asyncio.wait(clients, timeout=rss_every_s)
                result.seconds = time.perf_counter() - start
                result.rss_mb.append((result.seconds, _rss_mb(server.pid)))

        asyncio.run(main())
        if server.poll() is not None:
            raise DistillError(f"the server exited during the soak (code {server.returncode})")
        return result.summary()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_for_server(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
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
        "| requests ok | failed | left on purpose | p50 s | p99 s | completion tokens/s | "
        "RSS after warm-up MB | RSS end MB | RSS max MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests_ok']} | {s['requests_failed']} | {s['disconnected']} | {s['p50_s']:.2f} | "
        f"{s['p99_s']:.2f} | {s['completion_tokens_per_s']:.1f} | {s['rss_after_warmup_mb']:.0f} | "
        f"{s['rss_end_mb']:.0f} | {s['rss_max_after_warmup_mb']:.0f} |",
        f"({s['seconds']:.0f} s, {s['concurrency']} clients; RSS at start "
        f"{s['rss_start_mb']:.0f} MB)"])


def write_json(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")

