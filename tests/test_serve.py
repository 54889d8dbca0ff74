"""`distill serve`: the OpenAI-compatible app over a toy R1-style model, run for real on a loopback
port (answers equal the sampling engine's, reasoning split out, streaming, logprobs, batching of
concurrent requests, faults, 4xx answers), and generate's streaming hook."""

import copy
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from distill import sampling
from distill.chat import prompt_ids, split_reasoning
from distill.sampling import SamplingParams, generate, stop_ids
from distill.serve.app import ServerThread, build_app
from distill.serve.protocol import StreamText, visible_text
from tests.faults import FaultConfig, with_faults
from tests.helpers import assert_user_error, invoke_cli

QUESTION = "Start with 7. Add 3, then multiply by 2. What is the result?"


@pytest.fixture(scope="module")
def server(toy_qwen2):
    app = build_app(*toy_qwen2, "toy", max_batch=16)
    with ServerThread(app) as base_url:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            yield app, client


def chat(client, **body):
    body.setdefault("messages", [{"role": "user", "content": QUESTION}])
    body.setdefault("max_tokens", 16)
    return client.post("/v1/chat/completions", json=body)


def engine_text(toy_qwen2, params: SamplingParams):
    model, tok = toy_qwen2
    [c] = generate(model, [prompt_ids(tok, QUESTION)], params, stop_ids(model, tok), tok,
                   pad_id=tok.pad_token_id or 0)
    return c


# ------------------------------------------------------------------ reasoning split (no model)


@pytest.mark.parametrize("text, opened, expected", [
    ("7 + 3 = 10\n</think>\n\nThe answer is 20.", True, ("7 + 3 = 10", "The answer is 20.")),
    ("still thinking", True, ("still thinking", None)),
    ("<think>\nr\n</think>\n\na", False, ("r", "a")),
    ("\n<think>r</think>a", False, ("r", "a")),
    ("just an answer", False, (None, "just an answer")),
    ("</think>a", True, ("", "a")),
])
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened) == expected


@pytest.mark.parametrize("text, opened, stops", [
    ("7 + 3 = 10\n</think>\n\nThe answer is 20. STOP here", True, ("STOP",)),
    ("<think>\nhm\n</think>\n\nok", False, ()),
    ("plain answer, no think</ block", False, ("</b",)),
    ("unclosed reasoning \n\n", True, ()),
])
def test_streamed_deltas_add_up_to_the_final_split(text, opened, stops):
    final = visible_text(text, stops) if any(s in text for s in stops) else text
    stream, got = StreamText(opened, stops), {"reasoning_content": "", "content": ""}
    for end in range(len(text) + 1):  # every prefix, as a token-by-token stream would show
        for key, part in stream.update(text[:end]).items():
            got[key] += part
    for key, part in stream.update(final, final=True).items():
        got[key] += part
    reasoning, content = split_reasoning(final, opened)
    assert got == {"reasoning_content": reasoning or "", "content": content or ""}


def test_visible_text_holds_back_partial_stops_and_characters():
    assert visible_text("abc ST", ("STOP",)) == "abc "
    assert visible_text("abc STOP more", ("STOP",)) == "abc "
    assert visible_text("caf\ufffd", ()) == "caf"


# ------------------------------------------------------------------ the endpoints


def test_models_lists_the_model(server):
    _, client = server
    data = client.get("/v1/models").json()
    assert [m["id"] for m in data["data"]] == ["toy"] and data["object"] == "list"


def test_completion_shape_and_usage(server):
    _, client = server
    r = chat(client, model="toy", temperature=0, logprobs=True)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "toy"
    assert data["id"].startswith("chatcmpl-")
    [choice] = data["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 5)])
def test_answer_equals_the_sampling_engine(server, toy_qwen2, temperature, seed):
    """A request served alone draws what generate draws (greedy, and sampled with its seed)."""
    _, client = server
    body = dict(temperature=temperature, max_tokens=16, logprobs=True,
                return_tokens_as_token_ids=True)
    if seed is not None:
        body["seed"] = seed
    data = chat(client, **body).json()
    want = engine_text(toy_qwen2, SamplingParams(max_new_tokens=16, temperature=temperature,
                                              seed=seed or 0, logprobs=1))
    [choice] = data["choices"]
    ids = [int(e["token"].removeprefix("token_id:")) for e in choice["logprobs"]["content"]]
    assert ids == want.token_ids
    reasoning, content = split_reasoning(want.text, opened=True)
    assert (choice["message"]["reasoning_content"], choice["message"]["content"]) == (
        reasoning, content)
    assert choice["finish_reason"] == want.finish_reason
    assert data["usage"]["completion_tokens"] == len(want.token_ids)
    assert data["usage"]["prompt_tokens"] == len(prompt_ids(toy_qwen2[1], QUESTION))


def test_reasoning_is_split_only_when_the_template_opens_a_think_block(toy_qwen2):
    """The R1 template opens <think> in the prompt: the (unclosed) text is reasoning. A template
    without one gives plain content and no reasoning."""
    model, tok = toy_qwen2
    plain_tok = copy.copy(tok)
    plain_tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64,
            "temperature": 1.0, "seed": 3}
    answers = {}
    for name, t in (("r1", tok), ("plain", plain_tok)):
        with TestClient(build_app(model, t, name)) as client:
            answers[name] = client.post("/v1/chat/completions", json=body).json()
    r1 = answers["r1"]["choices"][0]["message"]
    plain = answers["plain"]["choices"][0]["message"]
    assert r1["reasoning_content"] and r1["content"] is None  # the block stays open
    assert plain["reasoning_content"] is None and plain["content"]


def sse(client, **body):
    events = []
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": QUESTION}], "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line[len("data: "):])
    return events


def test_streamed_deltas_equal_the_plain_answer(server):
    _, client = server
    body = dict(max_tokens=64, temperature=1.0, seed=11)  # 64 tokens: two decode chunks
    plain = chat(client, **body).json()
    events = sse(client, **body, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    text = {key: "".join(d.get(key) or "" for d in deltas) for key in ("reasoning_content", "content")}
    message = plain["choices"][0]["message"]
    assert text == {k: message[k] or "" for k in text}
    assert sum(1 for d in deltas if d.get("reasoning_content")) >= 2  # it streamed, in pieces
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == plain["choices"][0]["finish_reason"] and not any(finish[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_logprobs_name_tokens_by_id(server):
    _, client = server
    data = chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3,
                return_tokens_as_token_ids=True).json()
    entries = data["choices"][0]["logprobs"]["content"]
    assert len(entries) == data["usage"]["completion_tokens"]
    for e in entries:
        top = e["top_logprobs"]
        assert len(top) == 3 and all(t["token"].startswith("token_id:") for t in top)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert e["token"] == top[0]["token"] and e["logprob"] == top[0]["logprob"]  # greedy
    plain = chat(client, temperature=0, max_tokens=8, logprobs=True).json()
    entry = plain["choices"][0]["logprobs"]["content"][0]
    assert entry["top_logprobs"] == [] and not entry["token"].startswith("token_id:")


def test_n_choices(server):
    _, client = server
    data = chat(client, n=2, temperature=1.0, seed=1, max_tokens=64).json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    texts = [c["message"]["reasoning_content"] for c in data["choices"]]
    assert texts[0] != texts[1]
    assert 0 < data["usage"]["completion_tokens"] <= 2 * 64


def test_concurrent_requests_share_generate_calls(server):
    app, client = server
    engine = app.state.engine
    before, answers = engine.generate_calls, [None] * 8

    def ask(i):
        answers[i] = chat(client, max_tokens=4 + i, temperature=0,
                          messages=[{"role": "user", "content": f"question {i}"}])

    with engine.paused():
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while engine.pending < 8:
            time.sleep(0.01)
    for t in threads:
        t.join()
    assert engine.generate_calls == before + 1
    for i, r in enumerate(answers):
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4 + i


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "messages"),
    ({"max_tokens": 4}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096}, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 25}, "top_logprobs"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": "hi"}, "messages"),
])
def test_bad_requests_get_400(server, body, needle):
    _, client = server
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == 400


def test_bad_json_unknown_model_and_route(server):
    _, client = server
    r = client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = chat(client, model="gpt-4")
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(toy_qwen2):
    with TestClient(build_app(*toy_qwen2, "toy", api_key="sekrit")) as client:
        assert client.get("/v1/models").status_code == 401
        r = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and "sekrit" not in r.text
        assert client.post("/v1/chat/completions", json={}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekrit"}).status_code == 200


# ------------------------------------------------------------------ faults


def faulty(toy_qwen2, kind, **kw):
    return ServerThread(with_faults(build_app(*toy_qwen2, "toy"),
                                    FaultConfig(rate=1.0, kinds=(kind,), **kw)))


def test_fault_kinds(toy_qwen2):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0,
            "logprobs": True}
    with faulty(toy_qwen2, "429", retry_after_s=3) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
    with faulty(toy_qwen2, "500") as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 500
    with faulty(toy_qwen2, "drop") as url, pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{url}/v1/chat/completions", json=body)
    with faulty(toy_qwen2, "hang") as url, pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    with faulty(toy_qwen2, "hang", hang_s=0.2) as url:  # a bounded hang, then the answer
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200


# ------------------------------------------------------------------ generate's streaming hook


def test_generate_on_chunk_reports_every_token_once(toy_qwen2):
    model, tok = toy_qwen2
    ids = prompt_ids(tok, QUESTION)
    params = SamplingParams(max_new_tokens=64, temperature=1.0, n=2, seed=4)
    calls = []
    got = generate(model, [ids], params, stop_ids(model, tok), tok, on_chunk=calls.append)
    plain = generate(model, [ids], params, stop_ids(model, tok), tok)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert len(calls) == 2 and all(len(rows) == 2 for rows in calls)  # 64 tokens: two chunks
    eos = set(stop_ids(model, tok))
    for j, c in enumerate(got):
        streamed = [t for rows in calls for t in rows[j]]
        assert [t for t in streamed if t not in eos] == c.token_ids


def test_rows_on_chunk_drops_end_there_and_the_others_run_on(toy_qwen2):
    model, tok = toy_qwen2
    ids = prompt_ids(tok, QUESTION)
    params = SamplingParams(max_new_tokens=128, temperature=0.0)
    chunks = []

    def drop_the_second(rows):
        chunks.append(rows)
        return [1]

    got = generate(model, [ids, ids], params, stop_ids(model, tok), tok,
                   on_chunk=drop_the_second)
    [plain] = generate(model, [ids], params, stop_ids(model, tok), tok)
    assert len(plain.token_ids) == 128  # greedy runs the whole budget here
    assert got[0].token_ids == plain.token_ids and len(chunks) == 4
    first = len(chunks[0][1])  # the first chunk: the prefill's token and STOP_CHECK_EVERY more
    assert first <= sampling.STOP_CHECK_EVERY + 1
    assert got[1].token_ids == plain.token_ids[:first] and got[1].finish_reason == "length"
    assert all(rows[1] == [] for rows in chunks[1:])


def test_a_new_seed_does_not_compile_again(toy_qwen2):
    model, tok = toy_qwen2
    ids = prompt_ids(tok, QUESTION)
    generate(model, [ids], SamplingParams(max_new_tokens=64, temperature=1.0, seed=1))
    size = sampling._decode_chunk._cache_size()
    a = generate(model, [ids], SamplingParams(max_new_tokens=64, temperature=1.0, seed=2))
    b = generate(model, [ids], SamplingParams(max_new_tokens=64, temperature=1.0, seed=3))
    assert sampling._decode_chunk._cache_size() == size
    assert not np.array_equal(a[0].token_ids, b[0].token_ids)


# ------------------------------------------------------------------ the command line


def test_cli_help():
    proc = invoke_cli(["serve", "--help"])
    assert proc.returncode == 0
    for needle in ("/v1/chat/completions", "--host", "--port", "--max-batch", "--api-key-env"):
        assert needle in proc.stdout
    assert "--fault-rate" not in proc.stdout  # drills only


def test_cli_errors_are_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = invoke_cli(["serve", tmp_path, "--port", port])
    assert_user_error(proc, f"cannot listen on 127.0.0.1:{port}")
    proc = invoke_cli(["serve", tmp_path, "--api-key-env", "DISTILL_TEST_NO_SUCH_KEY"])
    assert_user_error(proc, "DISTILL_TEST_NO_SUCH_KEY is not set")


def _wait_until(pred, timeout=60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and not pred():
        time.sleep(0.05)
    return pred()


def test_clients_that_leave_free_their_batch_slot(toy_qwen2):
    app = build_app(*toy_qwen2, "toy", max_batch=4)
    engine = app.state.engine
    long = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1536,
            "temperature": 0}
    with ServerThread(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        whole = client.post("/v1/chat/completions", json=long).json()
        assert whole["usage"]["completion_tokens"] == 1536  # greedy: the same request runs this long
        before = engine.tokens_generated
        # a streaming client reads its first delta and hangs up: its round ends at the next chunk
        with client.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
            first_text = next(x for x in r.iter_lines() if x and '"role"' not in x)
        assert '"delta"' in first_text  # the round was decoding when the client left
        assert _wait_until(lambda: engine.jobs_cancelled == 1 and engine.jobs_done == 2)
        assert engine.tokens_generated - before < 1536 // 2
        # a plain client gives up while its request waits in the queue: it never runs
        calls = engine.generate_calls
        with engine.paused():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base_url}/v1/chat/completions", json=long, timeout=0.3)
            time.sleep(1.0)  # the server notices within DISCONNECT_POLL_S
        assert _wait_until(lambda: engine.jobs_cancelled == 2)
        assert engine.generate_calls == calls and engine.pending == 0
        assert chat(client).status_code == 200
