"""The OpenAI-compatible teacher against a real `distill serve` app on a loopback port: samples in
order with their fields, every (prompt, sample) exactly once through injected faults, Retry-After
honoured, rejections fail at once with the server's message, and the API key never shows."""

import json
import logging
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from distill.backends.http import (
    OpenAISampler,
    OpenAISamplerConfig,
    bench_http,
    chat_url,
    retry_after_s,
)
from distill.chat import THINK_CLOSE
from distill.data.records import PromptRecord
from distill.errors import DistillError
from distill.inference import EngineConfig
from distill.sampling import SamplingParams
from distill.serve.app import ServerThread, build_app
from distill.tokenizer import Tokenizer
from tests.faults import FaultConfig, with_faults

PROMPTS = [PromptRecord(f"p{i}", f"Start with {i}. Add 3. What is the result?") for i in range(5)]
PROMPTS.append(PromptRecord("chat", [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is 2 + 2?"}]))


@pytest.fixture(scope="module")
def base_url(toy_qwen2):
    with ServerThread(build_app(*toy_qwen2, "toy", config=EngineConfig(slots=4))) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_url(toy_qwen2):
    with ServerThread(build_app(*toy_qwen2, "toy", api_key="sekrit-123")) as url:
        yield url


def teacher(url, **kw):
    return OpenAISampler(OpenAISamplerConfig(base_url=url, model="toy", **kw))


PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=7)


def test_samples_in_order_with_their_fields(base_url):
    seen = []
    out = teacher(base_url).complete(PROMPTS, PARAMS, on_sample=lambda _k, s: seen.append(s))
    assert len(out) == len(PROMPTS) and len(seen) == 2 * len(PROMPTS)
    for group in out:
        assert [s.sample_index for s in group] == [0, 1]
        for s in group:
            if s.completion_tokens == 0:  # the random toy model at temperature 1 can sample its
                assert s.finish_reason == "stop" and s.completion == ""  # EOS first
                continue
            # the R1 template opens <think>; the server splits the reasoning out and the teacher
            # puts the raw form back together (usually unclosed after 12 tokens, but the random
            # toy model at temperature 1 can sample </think> itself)
            if s.reasoning is None:  # it sampled </think> first: the empty think block's
                assert s.completion and THINK_CLOSE not in s.completion  # content alone
                continue
            head = f"<think>\n{s.reasoning}"
            assert s.completion == head or s.completion.startswith(head + "\n</think>\n\n")
            assert s.finish_reason in ("stop", "length") and s.prompt_tokens > 0
            assert 0 < s.completion_tokens <= 12
    assert sum(s.completion_tokens > 0 for group in out for s in group) >= len(PROMPTS)
    assert out[0][0].completion != out[0][1].completion  # per-sample seeds differ


def test_a_rerun_asks_for_the_same_samples(base_url):
    """Seeds depend on the run seed, prompt id and sample index only; with one request at a time
    the server draws each alone, so a rerun (or resumption) gets the same text."""
    one = teacher(base_url, concurrency=1)
    first = one.complete(PROMPTS[:2], PARAMS)
    again = one.complete(PROMPTS[:2], PARAMS)
    assert [[s.completion for s in g] for g in first] == [[s.completion for s in g] for g in again]


def test_logprobs_come_with_token_ids(base_url):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=3)
    [[s]] = teacher(base_url).complete(PROMPTS[:1], params)
    assert len(s.top_ids) == len(s.top_logprobs) == s.completion_tokens
    for ids, lps in zip(s.top_ids, s.top_logprobs, strict=True):
        assert len(ids) == 3 and all(0 <= i < 320 for i in ids)
        assert lps == sorted(lps, reverse=True)
    assert s.token_bytes is None  # no tokenizer named: "token_id:N" tokens carry no bytes


def test_logprobs_come_with_bytes_from_the_named_tokenizer(base_url, toy_qwen2_dir):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=3)
    http = teacher(base_url, tokenizer=str(toy_qwen2_dir))
    [[s]] = http.complete(PROMPTS[:1], params)
    table = Tokenizer.from_pretrained(toy_qwen2_dir).token_bytes()
    assert s.top_bytes == [[table[i] for i in row] for row in s.top_ids]
    # greedy: each sampled token is its row's most likely entry
    assert s.token_bytes == [table[row[0]] for row in s.top_ids] and len(s.token_bytes) == 12
    assert http.tokenizer_identity["vocab_size"] == len(table)


def warm_up(app, url: str, prompts, params) -> None:
    """One request with faults off (no draw from the fault sequence), so the server compiles
    what its answers need and only injected hangs time out."""
    cfg = app.cfg
    app.cfg = cfg.model_copy(update={"kinds": ()})
    try:
        teacher(url).complete(prompts[:1], params)
    finally:
        app.cfg = cfg


def test_faults_every_sample_exactly_once(toy_qwen2, caplog):
    """~30% of requests fail (429 + Retry-After 0, 500, hang past the timeout, dropped
    connection); the run still returns every (prompt, sample) once, in order."""
    faults = FaultConfig(rate=0.3, seed=12, retry_after_s=0)
    app = with_faults(build_app(*toy_qwen2, "toy", config=EngineConfig(slots=2)), faults)
    prompts = [PromptRecord(f"f{i}", f"Fault drill {i}") for i in range(8)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0, n=2)
    with ServerThread(app) as url, caplog.at_level(logging.WARNING):
        warm_up(app, url, prompts, params)
        out = teacher(url, timeout_s=2.0, backoff_initial_s=0.05, backoff_max_s=0.2,
                      max_retries=20).complete(prompts, params)
    assert set(app.state.faults) == {"429", "500", "hang", "drop"}
    assert [[s.sample_index for s in g] for g in out] == [[0, 1]] * len(prompts)
    assert all(s.completion_tokens > 0 for g in out for s in g)
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) >= sum(app.state.faults.values())


def test_retry_after_is_honoured():
    answers = [
        httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"message": "slow"}}),
        httpx.Response(503, headers={"Retry-After": format_datetime(
            datetime.now(UTC) + timedelta(seconds=30), usegmt=True)}),
        httpx.Response(502),
        httpx.Response(200, json={"choices": [{"message": {"content": "4"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 1}}),
    ]
    requests, delays = [], []

    def handler(request):
        requests.append(json.loads(request.content))
        return answers[len(requests) - 1]

    t = OpenAISampler(OpenAISamplerConfig(base_url="http://teacher.test/v1", model="m",
                                      backoff_initial_s=0.5, backoff_max_s=1.0),
                    transport=httpx.MockTransport(handler), sleep=delays.append)
    [[s]] = t.complete(PROMPTS[:1], SamplingParams(max_new_tokens=4))
    assert (s.completion, s.reasoning, s.finish_reason, s.completion_tokens) == ("4", None,
                                                                                 "stop", 1)
    assert len(requests) == 4 and requests[0] == requests[3]  # the same request each time
    assert delays[0] == 3.0 and 20 < delays[1] <= 30  # as the server asked
    assert 0 <= delays[2] <= 1.0  # no Retry-After: full jitter, min(max, 0.5 * 2**2)


def test_retry_after_parsing():
    assert retry_after_s("7") == 7.0 and retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: at once


def test_rejections_fail_at_once_with_the_servers_message(base_url, keyed_url, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", "wrong-key")
    delays = []
    t = OpenAISampler(OpenAISamplerConfig(base_url=keyed_url, model="toy",
                                      api_key_env="DISTILL_TEST_KEY"), sleep=delays.append)
    with pytest.raises(DistillError, match=r"HTTP 401: invalid API key$"):
        t.complete(PROMPTS[:1], SamplingParams(max_new_tokens=4))
    bad = teacher(base_url, extra_body={"top_logprobs": 50, "logprobs": True})
    bad._sleep = delays.append
    with pytest.raises(DistillError, match=r"/v1/chat/completions: HTTP 400: top_logprobs"):
        bad.complete(PROMPTS[:1], SamplingParams(max_new_tokens=4))
    assert delays == []  # no retries


def test_unreachable_server_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = OpenAISampler(OpenAISamplerConfig(base_url=f"http://127.0.0.1:{port}", model="m",
                                      max_retries=2), sleep=lambda _: None)
    with pytest.raises(DistillError) as e:
        t.complete(PROMPTS[:2], SamplingParams(max_new_tokens=4))
    assert str(e.value) == (f"cannot reach http://127.0.0.1:{port}/v1/chat/completions after 3 "
                            "attempts: connection refused")


def test_api_key_is_sent_and_never_shown(keyed_url, monkeypatch, caplog):
    monkeypatch.setenv("DISTILL_TEST_KEY", "sekrit-123")
    cfg = OpenAISamplerConfig(base_url=keyed_url, model="toy", api_key_env="DISTILL_TEST_KEY")
    t = OpenAISampler(cfg)
    with caplog.at_level(logging.DEBUG):
        [[s]] = t.complete(PROMPTS[:1], SamplingParams(max_new_tokens=4))
    assert s.completion_tokens > 0  # the server accepted the key
    shown = [repr(t), json.dumps(t.identity), cfg.model_dump_json(), repr(cfg), caplog.text]
    assert not any("sekrit-123" in text for text in shown)
    assert t.identity == {"kind": "openai", "base_url": keyed_url, "model": "toy"}


def test_missing_key_variable():
    cfg = OpenAISamplerConfig(base_url="http://x.test", model="m",
                              api_key_env="DISTILL_NO_SUCH_VAR")
    with pytest.raises(DistillError, match="environment variable DISTILL_NO_SUCH_VAR is not set"):
        OpenAISampler(cfg)


def test_answer_parsing():
    t = teacher("http://x.test/v1")

    def answer(message, finish="stop", **choice):
        return {"choices": [{"message": message, "finish_reason": finish, **choice}]}

    s = t.parse_sample(answer({"content": "20", "reasoning_content": "7+3=10"}), 0)
    assert s.completion == "<think>\n7+3=10\n</think>\n\n20" and s.reasoning == "7+3=10"
    s = t.parse_sample(answer({"content": None, "reasoning": "hmm"}, "length"), 1)
    assert (s.completion, s.reasoning, s.finish_reason) == ("<think>\nhmm", "hmm", "length")
    s = t.parse_sample(answer({"content": "<think>x</think>y"}, "eos"), 2)
    assert (s.completion, s.reasoning, s.finish_reason) == ("<think>x</think>y", None, "stop")
    named = {"content": [{"token": "a", "logprob": -0.1,
                          "top_logprobs": [{"token": "a", "logprob": -0.1}]}]}
    s = t.parse_sample(answer({"content": "a"}, logprobs=named), 0, want_logprobs=True)
    assert s.top_ids is None and s.top_logprobs == [[-0.1]]  # the server did not name ids
    assert s.token_bytes is None  # nor sent bytes
    named["content"][0] |= {"bytes": [0xE6]}
    named["content"][0]["top_logprobs"][0] |= {"bytes": [0xE6]}
    s = t.parse_sample(answer({"content": "a"}, logprobs=named), 0, want_logprobs=True)
    assert s.token_bytes == [b"\xe6"] and s.top_bytes == [[b"\xe6"]]  # the answer's own bytes
    with pytest.raises(DistillError, match="unexpected answer"):
        t.parse_sample({"choices": []}, 0)
    with pytest.raises(DistillError, match="asked for logprobs"):
        t.parse_sample(answer({"content": "a"}), 0, want_logprobs=True)


def test_chat_url():
    assert chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("https://x.test/v1beta/openai") == "https://x.test/v1beta/openai/chat/completions"
    with pytest.raises(DistillError, match="not an http"):
        chat_url("localhost:8000")


def test_bench_http(base_url):
    result = bench_http(base_url, "toy", requests=8, concurrency=4, max_new_tokens=8)
    assert result["requests"] == 8 and result["requests_per_s"] > 0


def test_every_backend_is_a_registered_sampler(toy_qwen2_dir):
    from distill.backends import BACKENDS, Sampler, make_sampler

    assert set(BACKENDS) == {"jax", "openai"}
    url = "http://teacher.test/v1"
    jax_sampler = make_sampler(BACKENDS["jax"].config(model=str(toy_qwen2_dir)))
    http_sampler = make_sampler(BACKENDS["openai"].config(base_url=url, model="toy"))
    for sampler in (jax_sampler, http_sampler):
        assert isinstance(sampler, Sampler)
        sampler.close()
    assert jax_sampler.identity["kind"] == "jax" and jax_sampler.tokenizer_identity is not None
    assert http_sampler.identity == {"kind": "openai", "base_url": url, "model": "toy"}
    assert http_sampler.tokenizer_identity is None
