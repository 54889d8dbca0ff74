"""The OpenAI-compatible sampler (`kind: openai`): samples from any `/v1/chat/completions` server
(vLLM, SGLang, the DeepSeek API, `distill serve`); and its scorer, the log-probabilities such a
server gives to tokens it is handed (`OpenAIScorer`, request and answer shapes in
`prompt_logprobs`).

One request per (prompt, sample) with `n=1` and its own seed, because many servers ignore `n`;
up to `concurrency` requests in flight. Rate limits, server errors, timeouts and dropped
connections are retried with exponential backoff and full jitter (honouring `Retry-After`);
a rejected request (400, 401, 403, 404, 422) fails at once with the server's message. The API key
is read from an environment variable and only ever sent in the Authorization header: it is never
part of the config, the sampler's identity, a log line or an error.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import Field

from distill.backends.base import Piece
from distill.backends.prompt_logprobs import (
    ENABLE,
    parse_sglang,
    parse_vllm,
    sglang_body,
    vllm_body,
)
from distill.config import Frozen, InputPath, read_api_key
from distill.data.records import PromptRecord, Sample
from distill.errors import DistillError
from distill.inference import TokenScores
from distill.sampling import SamplingParams, sample_seed
from distill.tokenizer import Tokenizer, tokenizer_identity

log = logging.getLogger(__name__)

RETRY_AFTER_MAX_S = 600.0  # a longer Retry-After is honoured only this far
_NOT_RETRIED_5XX = {501, 505}  # "not implemented" and "HTTP version not supported" will not change


class OpenAISamplerConfig(Frozen):
    """A model behind an OpenAI-compatible /v1/chat/completions endpoint.

    base_url: the API root, e.g. "http://127.0.0.1:8000/v1" or "https://api.deepseek.com" (a URL
    without a path gets "/v1"); requests go to base_url + "/chat/completions". api_key_env: the
    name of the environment variable holding the key (None: no key). extra_body: fields added to
    every request as they are, e.g. {"chat_template_kwargs": {"thinking": true}}. tokenizer: the
    server model's tokenizer (any tokenizer path), which turns the "token_id:N" tokens of its
    logprobs into the bytes they stand for (what distillation across tokenizers aligns) and
    names the tokenizer in the manifest; without it the bytes come from the answer's `bytes`
    fields, which servers fill from decoded text (not byte-exact for a token that splits a
    character). scoring: the API a `make_scorer` scorer asks for the log-probabilities of given
    tokens: "vllm" (`/v1/completions` with `prompt_logprobs`: vLLM, `distill serve`) or "sglang"
    (SGLang's `/generate` with `return_logprob`).
    """

    kind: Literal["openai"] = "openai"
    base_url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(8, ge=0)
    backoff_initial_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    extra_body: dict[str, Any] = {}
    tokenizer: InputPath | None = None
    scoring: Literal["vllm", "sglang"] = "vllm"


def chat_url(base_url: str) -> str:
    """The chat completions URL of an API root."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as e:
        raise DistillError(f"{base_url}: not a valid URL ({e})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise DistillError(f"{base_url}: not an http(s) URL")
    path = url.path.rstrip("/") or "/v1"
    return str(url.copy_with(path=f"{path}/chat/completions"))


def served_model(base_url: str, api_key_env: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model an OpenAI-compatible server lists at GET /v1/models (its served name)."""
    url = chat_url(base_url).removesuffix("/chat/completions") + "/models"
    headers = {"Authorization": f"Bearer {read_api_key(api_key_env, 'the server')}"} if (
        api_key_env) else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.TransportError as e:
        raise DistillError(f"{url}: {_describe(e, timeout_s)}") from None
    if response.status_code != 200:
        raise DistillError(f"{url}: HTTP {response.status_code}: {server_message(response)}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise DistillError(f"{url}: the server lists no model (give --model-name)") from None


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _retryable(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status not in _NOT_RETRIED_5XX)


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def server_message(response: httpx.Response) -> str:
    """The error message in a server's answer: OpenAI's {"error": {"message"}}, FastAPI's
    {"detail"}, {"message"}, or the body's text."""
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _one_line(response.text) or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        return _one_line(error if isinstance(error, str) else json.dumps(error))
    return _one_line(json.dumps(data))


def _describe(e: httpx.TransportError, timeout_s: float) -> str:
    if isinstance(e, httpx.ConnectTimeout):
        return f"could not connect within {timeout_s:g} s"
    if isinstance(e, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    text = str(e) or type(e).__name__
    if isinstance(e, httpx.ConnectError):
        return "connection refused" if "refused" in text.lower() else f"cannot connect ({text})"
    if isinstance(e, httpx.RemoteProtocolError):
        return f"connection dropped ({text})"
    return f"connection lost ({text})"


def _token_id(token) -> int | None:
    """The id in a "token_id:N" logprob token (vLLM's return_tokens_as_token_ids), else None."""
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            return None
    return None


class _Cancelled(Exception):
    """Another request of the same call failed; this one stops quietly."""


class HttpClient:
    """What the OpenAI-compatible backends share: a connection pool to one server and JSON POSTs to
    `self.url` retried with the config's backoff (`_post`).

    `transport` and `sleep` are for tests (an httpx transport, and a function that receives each
    backoff delay in seconds instead of waiting it).
    """

    url: str

    def __init__(self, cfg: OpenAISamplerConfig, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] | None = None):
        self.cfg = cfg
        headers = {}
        if cfg.api_key_env:
            key = read_api_key(cfg.api_key_env, f"for {cfg.base_url}")
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=cfg.concurrency,
                              max_keepalive_connections=cfg.concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(cfg.timeout_s),
                                    limits=limits, transport=transport)
        self._sleep = sleep
        self._rng = random.Random()
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_identity = None  # the server's tokenizer, where the config names it
        if cfg.tokenizer:
            self.tokenizer = Tokenizer.from_pretrained(cfg.tokenizer)
            self.tokenizer_identity = tokenizer_identity(self.tokenizer, cfg.tokenizer)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _each(self, tasks: list[tuple], fn: Callable[..., None], stop: threading.Event) -> None:
        """`fn(*task)` for every task on up to `concurrency` threads; the first failure sets
        `stop` (the others end at their next retry wait; queued ones never start) and is raised."""
        pool = ThreadPoolExecutor(min(self.cfg.concurrency, len(tasks)), "distill-http")
        futures = [pool.submit(fn, *task) for task in tasks]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _post(self, body: dict, stop: threading.Event, url: str | None = None) -> dict:
        """POST `body` to `url` (default `self.url`), retried as the config says."""
        url = url or self.url
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            if stop.is_set():
                raise _Cancelled
            wait, unreachable = None, False
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as e:  # timeouts included
                last, unreachable = _describe(e, self.cfg.timeout_s), isinstance(e, httpx.ConnectError)
            else:
                if response.status_code == 200:
                    return self._json(response)
                last = f"HTTP {response.status_code}: {server_message(response)}"
                if not _retryable(response.status_code):
                    raise DistillError(f"{url}: {last}")
                wait = retry_after_s(response.headers.get("retry-after"))
            if attempt + 1 < attempts:
                self._backoff(attempt, wait, f"{url}: {last}", stop)
        if unreachable:
            raise DistillError(f"cannot reach {url} after {attempts} attempts: {last}")
        raise DistillError(f"{url}: no answer after {attempts} attempts; last: {last}")

    def _backoff(self, attempt: int, retry_after: float | None, error: str,
                 stop: threading.Event) -> None:
        """Wait before retry `attempt + 1`: Retry-After when the server sent one, else a full-jitter
        exponential backoff capped at backoff_max_s."""
        if retry_after is not None:
            delay = min(retry_after, RETRY_AFTER_MAX_S)
        else:
            cap = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2**attempt)
            delay = self._rng.uniform(0, cap)
        log.warning("%s; retry %d of %d in %.2f s", error, attempt + 1,
                    self.cfg.max_retries, delay)
        if self._sleep is not None:
            self._sleep(delay)
        else:
            stop.wait(delay)

    def _json(self, response: httpx.Response) -> dict:
        try:
            data = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DistillError(f"{self.url}: the answer is not JSON: "
                               f"{_one_line(response.text, 120)!r}") from None
        if not isinstance(data, dict):
            raise DistillError(f"{self.url}: the answer is not a JSON object")
        return data


class OpenAISampler(HttpClient):
    """Samples completions from an OpenAI-compatible chat completions server (a `Sampler`).

    `transport` and `sleep` are for tests (see `HttpClient`).
    """

    def __init__(self, cfg: OpenAISamplerConfig, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] | None = None):
        super().__init__(cfg, transport=transport, sleep=sleep)
        self.url = chat_url(cfg.base_url)
        self._warned_ids = False
        self._token_bytes = self.tokenizer.token_bytes() if self.tokenizer else None

    @property
    def identity(self) -> dict:
        """What the traces record as their teacher (no key)."""
        return {"kind": self.cfg.kind, "base_url": self.cfg.base_url, "model": self.cfg.model}

    def __repr__(self) -> str:
        return f"OpenAISampler(url={self.url!r}, model={self.cfg.model!r})"

    # -- sampling

    def complete(self, prompts: list[PromptRecord], params: SamplingParams,
                 system: str | None = None,
                 on_sample: Callable[[int, Sample], None] | None = None,
                 indices: Sequence[Sequence[int]] | None = None) -> list[list[Sample]]:
        """`params.n` samples for each prompt (or those of `indices`), in order (see
        `Sampler.complete`). `on_sample(k, sample)` sees each sample as it arrives (from worker
        threads, one at a time). The first failure ends the call."""
        wanted = indices if indices is not None else [range(params.n)] * len(prompts)
        out: list[dict[int, Sample]] = [{} for _ in prompts]
        stop, lock = threading.Event(), threading.Lock()

        def one(i: int, s: int) -> None:
            sample = self.sample(prompts[i], s, params, system, stop)
            out[i][s] = sample
            if on_sample is not None and not stop.is_set():  # the call has not failed meanwhile
                with lock:
                    on_sample(i, sample)

        tasks = [(i, s) for i in range(len(prompts)) for s in wanted[i]]
        if tasks:
            self._each(tasks, one, stop)
        return [[got[s] for s in sorted(got)] for got in out]

    def request_body(self, prompt: PromptRecord, index: int, params: SamplingParams,
                     system: str | None = None) -> dict:
        """The JSON body asking for sample `index` of `prompt`."""
        body: dict[str, Any] = {
            "model": self.cfg.model, "messages": prompt.messages(system),
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "n": 1, "seed": sample_seed(params.seed, prompt.id, index)}
        if params.top_k:
            body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = list(params.stop)
        if params.logprobs:
            # vLLM's return_tokens_as_token_ids names each token by its id; others ignore it
            body.update(logprobs=True, top_logprobs=params.logprobs,
                        return_tokens_as_token_ids=True)
        return {**body, **self.cfg.extra_body}

    def sample(self, prompt: PromptRecord, index: int, params: SamplingParams,
               system: str | None = None, stop: threading.Event | None = None) -> Sample:
        """One sample (a request, retried as needed)."""
        data = self._post(self.request_body(prompt, index, params, system),
                          stop or threading.Event())
        return self.parse_sample(data, index, want_logprobs=params.logprobs > 0)

    # -- continuing given tokens (budget forcing)

    def extend(self, prefixes, params, reserve: int = 0) -> list[Piece]:
        """One sample continuing each prefix (token ids of the server's tokenizer), through
        `/v1/completions` (vLLM's, `distill serve`'s), up to `concurrency` in flight (an
        `Extender`: budget forcing's rounds; `reserve` is the server's business)."""
        out: list[Piece | None] = [None] * len(prefixes)
        stop, url = threading.Event(), score_url(self.cfg.base_url, "vllm")

        def one(i: int) -> None:
            q = params[i]
            body = {"model": self.cfg.model, "prompt": list(prefixes[i]),
                    "max_tokens": q.max_new_tokens, "temperature": q.temperature,
                    "top_p": q.top_p, "n": 1, "seed": q.seed}
            if q.top_k:
                body["top_k"] = q.top_k
            out[i] = _piece(self._post(body, stop, url), url)

        if prefixes:
            self._each([(i,) for i in range(len(prefixes))], one, stop)
        return out  # type: ignore[return-value]

    # -- answer -> Sample

    def parse_sample(self, data: dict, index: int, want_logprobs: bool = False) -> Sample:
        """A Sample from a chat completion answer.

        When the server split the reasoning out (`reasoning_content`, or vLLM's newer
        `reasoning`), `completion` is rebuilt as "<think>\\n{reasoning}\\n</think>\\n\\n{content}"
        (just "<think>\\n{reasoning}" when content is null: the think block never closed).
        """
        try:
            choice = data["choices"][0]
            message = choice["message"]
            content, finish = message.get("content"), choice.get("finish_reason")
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise DistillError(f"{self.url}: unexpected answer (no choices[0].message): "
                               f"{_one_line(json.dumps(data), 120)}") from None
        if not isinstance(content, str | None) or not isinstance(reasoning, str | None):
            raise DistillError(f"{self.url}: unexpected answer (message content is not text)")
        if reasoning:
            completion = f"<think>\n{reasoning}" + (
                "" if content is None else f"\n</think>\n\n{content}")
        else:
            completion, reasoning = content or "", None
        usage = data.get("usage") or {}
        top = self._logprobs(choice) if want_logprobs else {}
        return Sample(sample_index=index, completion=completion,
                      finish_reason="length" if finish == "length" else "stop",
                      prompt_tokens=int(usage.get("prompt_tokens") or 0),
                      completion_tokens=int(usage.get("completion_tokens") or 0),
                      reasoning=reasoning, **top)

    def _logprobs(self, choice: dict) -> dict:
        """Per completion token, the top-k ids (None unless the server named tokens by id) and
        log-probabilities, and the bytes of the sampled tokens and of the entries where known."""
        entries = (choice.get("logprobs") or {}).get("content")
        if entries is None:
            raise DistillError(f"{self.url}: asked for logprobs but the answer has none")
        try:
            tops = [entry.get("top_logprobs") or [] for entry in entries]
            top_logprobs = [[float(t["logprob"]) for t in row] for row in tops]
            top_ids = [[_token_id(t.get("token")) for t in row] for row in tops]
            sampled = [_token_id(entry.get("token")) for entry in entries]
            token_bytes, top_bytes = self._bytes(entries, tops, sampled, top_ids)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DistillError(f"{self.url}: malformed logprobs in the answer") from None
        if any(i is None for row in top_ids for i in row):
            if not self._warned_ids:
                log.warning("%s: logprob tokens are not 'token_id:N' (the server ignores "
                            "return_tokens_as_token_ids): top_ids are not stored", self.url)
                self._warned_ids = True
            top_ids = None
        return {"top_ids": top_ids, "top_logprobs": top_logprobs, "token_bytes": token_bytes,
                "top_bytes": top_bytes}

    def _bytes(self, entries, tops, sampled, top_ids):
        """(sampled tokens' bytes, entries' bytes): from the configured tokenizer's table by id,
        else from the answer's `bytes` fields; (None, None) where neither is there."""
        table = self._token_bytes
        if table is not None and all(i is not None and 0 <= i < len(table)
                                     for i in sampled + [j for row in top_ids for j in row]):
            return [table[i] for i in sampled], [[table[j] for j in row] for row in top_ids]
        if all(e.get("bytes") is not None and _token_id(e.get("token")) is None
               for e in [*entries, *(t for row in tops for t in row)]):
            return ([bytes(e["bytes"]) for e in entries],
                    [[bytes(t["bytes"]) for t in row] for row in tops])
        return None, None


def _piece(data: dict, url: str) -> Piece:
    """A Piece from a /v1/completions answer."""
    try:
        choice = data["choices"][0]
        text, finish = choice["text"], choice.get("finish_reason")
        tokens = int((data.get("usage") or {})["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise DistillError(f"{url}: unexpected answer (no choices[0].text or "
                           f"usage.completion_tokens): {_one_line(json.dumps(data), 120)}") from None
    if not isinstance(text, str):
        raise DistillError(f"{url}: unexpected answer (choices[0].text is not text)")
    return Piece(text, tokens, "length" if finish == "length" else "stop")


def score_url(base_url: str, scoring: str) -> str:
    """Where a scorer posts: vLLM's /v1/completions beside chat completions, or SGLang's
    /generate at the server's root (a trailing "/v1" of base_url dropped)."""
    chat = chat_url(base_url)
    if scoring == "vllm":
        return chat.removesuffix("/chat/completions") + "/completions"
    url = httpx.URL(chat.removesuffix("/chat/completions"))
    return str(url.copy_with(path=url.path.rstrip("/").removesuffix("/v1") + "/generate"))


class OpenAIScorer(HttpClient):
    """The log-probabilities a served model gives to tokens it is handed (a `Scorer`): vLLM's (or
    `distill serve`'s) /v1/completions with `prompt_logprobs`, or SGLang's /generate with
    `return_logprob` (`cfg.scoring`); one request per sequence, up to `concurrency` in flight,
    retried as the sampler's are. The first request of the scorer's life goes alone: a server
    that cannot score is one DistillError line naming the URL and what to enable, before any
    other request. `vocab_size` is the configured tokenizer's (None without one; the whole
    vocabulary is then available from vLLM only)."""

    def __init__(self, cfg: OpenAISamplerConfig, *, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] | None = None):
        super().__init__(cfg, transport=transport, sleep=sleep)
        self.url = score_url(cfg.base_url, cfg.scoring)
        self.vocab_size = self.tokenizer.vocab_size if self.tokenizer else None
        self._probed = False

    @property
    def identity(self) -> dict:
        """Where the scores come from (no key)."""
        return {"kind": self.cfg.kind, "base_url": self.cfg.base_url, "model": self.cfg.model,
                "scoring": self.cfg.scoring}

    def __repr__(self) -> str:
        return f"OpenAIScorer(url={self.url!r}, model={self.cfg.model!r})"

    def score(self, prompts, completions, top_k: int | None = 0) -> list[TokenScores]:
        """The server's log-probabilities of each completion given its prompt (token ids in the
        server's tokenization), in order; see `distill.inference.score_sequences` for top_k."""
        if len(prompts) != len(completions):
            raise DistillError(f"{len(prompts)} prompts but {len(completions)} completions")
        if top_k is None and self.cfg.scoring == "sglang" and self.vocab_size is None:
            raise DistillError(f"{self.url}: the whole vocabulary from SGLang needs its size: set "
                               "the teacher's tokenizer")
        out: list[TokenScores | None] = [None] * len(prompts)
        stop = threading.Event()

        def one(i: int) -> None:
            out[i] = self.score_one(prompts[i], completions[i], top_k, stop)

        tasks = [(i,) for i in range(len(prompts))]
        if tasks and not self._probed:  # a server that cannot score says so before the rest go
            try:
                one(0)
            except DistillError as e:
                raise DistillError(_with_hint(str(e), self.cfg.scoring)) from None
            self._probed, tasks = True, tasks[1:]
        if tasks:
            self._each(tasks, one, stop)
        return out  # type: ignore[return-value]

    def score_one(self, prompt, completion, top_k: int | None = 0,
                  stop: threading.Event | None = None) -> TokenScores:
        """One sequence's scores (a request, retried as needed)."""
        ids = [*prompt, *completion]
        if self.cfg.scoring == "vllm":
            body, parse = vllm_body(self.cfg.model, ids, top_k), parse_vllm
        else:
            body, parse = sglang_body(ids, top_k, self.vocab_size), parse_sglang
        data = self._post({**body, **self.cfg.extra_body}, stop or threading.Event())
        return parse(data, len(prompt), completion, top_k, self.url)


def _with_hint(message: str, scoring: str) -> str:
    """A rejected probe request's error, with what the server needs to score."""
    if re.search(r": HTTP 4\d\d: ", message):
        return f"{message} (scoring needs prompt log-probabilities: {ENABLE[scoring]})"
    return message


def bench_http(base_url: str, model: str, *, requests: int = 64, concurrency: int = 8,
               max_new_tokens: int = 32, temperature: float = 0.0,
               api_key_env: str | None = None) -> dict:
    """Completed requests per second of OpenAISampler against a server (e.g. `distill serve`): the
    number `distill bench` reports. Prompts are distinct short arithmetic questions."""
    sampler = OpenAISampler(OpenAISamplerConfig(
        base_url=base_url, model=model, api_key_env=api_key_env, concurrency=concurrency,
        max_retries=2))
    prompts = [PromptRecord(f"bench-{i}", f"Start with {i}. Add 3, then multiply by 2. "
                            "What is the result?") for i in range(requests)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    start = time.perf_counter()
    try:
        samples = sampler.complete(prompts, params)
    finally:
        sampler.close()
    seconds = time.perf_counter() - start
    tokens = sum(s.completion_tokens for group in samples for s in group)
    return {"requests": requests, "concurrency": concurrency, "max_new_tokens": max_new_tokens,
            "seconds": seconds, "requests_per_s": requests / seconds,
            "completion_tokens_per_s": tokens / seconds}
