"""`distill serve`: the OpenAI-compatible app over a toy R1-style model, run for real on a loopback
port (answers equal the inference engine's, reasoning split out, streaming, logprobs, concurrent
requests side by side with their own settings, seeds, compiles, faults, 4xx answers)."""

import copy
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from distill.chat import prompt_ids, split_reasoning
from distill.inference import Engine, EngineConfig, compiles
from distill.sampling import SamplingParams
from distill.serve.app import ServerThread, build_app
from distill.serve.protocol import StreamText, visible_text
from tests.faults import FaultConfig, with_faults
from tests.helpers import assert_user_error, invoke_cli

QUESTION = "Start with 7. Add 3, then multiply by 2. What is the result?"


@pytest.fixture(scope="module")
def server(toy_qwen2):
    app = build_app(*toy_qwen2, "toy")  # 16 slots of 2,048 tokens (the toy's context)
    with ServerThread(app) as base_url:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            yield app, client


def chat(client, **body):
    body.setdefault("messages", [{"role": "user", "content": QUESTION}])
    body.setdefault("max_tokens", 16)
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def reference(toy_qwen2):
    """An engine of the server's shape in the test's own thread."""
    return Engine(*toy_qwen2)


def engine_text(reference, params: SamplingParams, question: str = QUESTION):
    [c] = reference.generate([prompt_ids(reference.tokenizer, question)], params)
    return c


def ids_of(choice) -> list[int]:
    """A choice's token ids, from its logprobs (asked with return_tokens_as_token_ids)."""
    return [int(e["token"].removeprefix("token_id:")) for e in choice["logprobs"]["content"]]


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
def test_answer_equals_the_inference_engine(server, reference, toy_qwen2, temperature, seed):
    """A request draws what the engine's generate draws (greedy, and sampled with its seed)."""
    _, client = server
    body = dict(temperature=temperature, max_tokens=16, logprobs=True,
                return_tokens_as_token_ids=True)
    if seed is not None:
        body["seed"] = seed
    data = chat(client, **body).json()
    want = engine_text(reference, SamplingParams(max_new_tokens=16, temperature=temperature,
                                                 seed=seed or 0, logprobs=1))
    [choice] = data["choices"]
    assert ids_of(choice) == want.token_ids
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
    body = dict(max_tokens=64, temperature=1.0, seed=11)  # 64 tokens: several host visits
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


def ask_together(client, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at once, each from its own thread; the answers in order."""
    answers = [None] * len(bodies)

    def ask(i):
        answers[i] = chat(client, **bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


# the seeded request, and seven others with settings of their own (greedy, top-k, top-p, n = 2,
# logprobs, no seed, other budgets and prompts)
SEEDED = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, logprobs=True,
              return_tokens_as_token_ids=True)
OTHERS = [dict(temperature=0, max_tokens=30), dict(temperature=1.0, top_k=5, max_tokens=8),
          dict(temperature=0.3, top_p=0.5, seed=1, max_tokens=20),
          dict(temperature=0.6, n=2, max_tokens=16), dict(temperature=1.2, max_tokens=12),
          dict(temperature=0.05, logprobs=True, top_logprobs=2, max_tokens=28),
          dict(temperature=0.9, top_k=40, top_p=0.95, max_tokens=6,
               messages=[{"role": "user", "content": "Start with 5. Add 1. Result?"}])]


def test_a_seeded_request_draws_the_same_tokens_alone_and_beside_others(server, reference):
    app, client = server
    alone = chat(client, **SEEDED).json()["choices"][0]
    want = engine_text(reference, SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9,
                                                 seed=7, logprobs=1))
    assert ids_of(alone) == want.token_ids
    engine = app.state.jobs.engine
    steps, tokens = engine.slot_steps, engine.tokens_delivered
    answers = ask_together(client, [SEEDED, *OTHERS])
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert ids_of(answers[0].json()["choices"][0]) == ids_of(alone)
    assert answers[0].json()["choices"][0]["message"] == alone["message"]
    # they shared the slots: one request alone fills at most 1/16 of the slot-steps
    assert (engine.tokens_delivered - tokens) / (engine.slot_steps - steps) > 1 / 16
    for r, body in zip(answers[1:], OTHERS, strict=True):
        usage = r.json()["usage"]
        assert 0 < usage["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)


@pytest.fixture(scope="module")
def warm_server(toy_qwen2):
    """A small engine (8 slots of 128 tokens) with every program compiled."""
    config = EngineConfig(slots=8, max_len=128, prefill_chunk=64, min_window=128)
    app = build_app(*toy_qwen2, "toy", config=config)
    programs, _ = app.state.jobs.warmup()
    assert programs == len(app.state.jobs.engine.programs) > 0
    with ServerThread(app) as base_url:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            yield app, client


@pytest.mark.slow
def test_new_sampling_settings_after_warmup_compile_nothing(warm_server):
    """8 concurrent requests, 8 temperatures (and top-p, top-k, seeds, budgets, logprobs,
    streaming) the server has never seen: no compile."""
    _, client = warm_server
    before = compiles()
    bodies = [dict(temperature=0.05 + 0.13 * i, top_p=1.0 - 0.05 * i, top_k=3 * i, seed=100 + i,
                   max_tokens=1 + 9 * i, logprobs=i % 3 == 0, stream=i == 7) for i in range(8)]
    answers = ask_together(client, bodies)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert compiles() == before


@pytest.mark.parametrize("body, needle", [
    ({"messages": []}, "messages"),
    ({"max_tokens": 4}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4096}, "limit of 2048"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, "16 slots"),
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


def test_requests_past_the_engine_get_400_and_the_others_run_on(server):
    """A prompt longer than the engine's limit, or max_tokens past it: 400 with one line, while
    a request already running streams on and a later one is answered."""
    _, client = server
    running, got = {}, []

    def stream():
        running["events"] = sse(client, max_tokens=48, temperature=0)

    t = threading.Thread(target=stream)
    t.start()
    long_prompt = [{"role": "user", "content": "x" * 3000}]  # 3,000 tokens: past 2,048
    for body in ({"messages": long_prompt}, {"messages": long_prompt, "max_tokens": 8},
                 {"max_tokens": 2040}, {"max_tokens": 2047}):
        r = chat(client, **body)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "\n" not in message, r.text
        assert "limit of 2048 tokens" in message and "max_tokens" in message
        got.append(message)
    assert "a prompt of 30" in got[0] and "a prompt of 42 tokens plus max_tokens 2040" in got[2]
    t.join()
    assert running["events"][-1] == "[DONE]"
    finish = json.loads(running["events"][-2])["choices"][0]["finish_reason"]
    assert finish in ("stop", "length")
    assert chat(client, max_tokens=4).status_code == 200


# ------------------------------------------------------------------ /v1/completions (vLLM's)


def test_completions_sample_from_token_ids_as_the_engine_does(server, reference, toy_qwen2):
    """A prompt of token ids (no chat template) draws what the engine draws for those ids; the
    legacy logprobs name the tokens, and prompt_logprobs hold each prompt token's entry."""
    _, client = server
    ids = prompt_ids(toy_qwen2[1], QUESTION)
    body = {"model": "toy", "prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 2,
            "return_tokens_as_token_ids": True, "prompt_logprobs": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    [choice] = data["choices"]
    [want] = reference.generate([ids], SamplingParams(max_new_tokens=8, logprobs=2))
    lp = choice["logprobs"]
    assert [int(t.removeprefix("token_id:")) for t in lp["tokens"]] == want.token_ids
    assert choice["text"] == want.text and choice["finish_reason"] == want.finish_reason
    assert lp["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-5)
    assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    rows = choice["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None
    for token, row in zip(ids[1:], rows[1:], strict=True):
        assert str(token) in row and len(row) in (3, 4)
        ranks = sorted(e["rank"] for e in row.values())
        assert ranks[:3] == [1, 2, 3] and row[str(token)]["rank"] >= 1
        assert row[str(token)]["decoded_token"] == toy_qwen2[1].decode([token])
    assert data["usage"]["prompt_tokens"] == len(ids)
    before = compiles()  # another k up to 20 runs the same scoring program
    r = client.post("/v1/completions", json={**body, "prompt_logprobs": 7})
    assert compiles() == before
    for token, row in zip(ids[1:], r.json()["choices"][0]["prompt_logprobs"][1:], strict=True):
        assert len(row) in (7, 8) and str(token) in row


def test_completions_of_text_and_the_whole_vocabulary(server, toy_qwen2):
    _, client = server
    tokenizer = toy_qwen2[1]
    r = client.post("/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 3,
                                             "prompt_logprobs": -1, "seed": 3})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    rows = choice["prompt_logprobs"]
    assert len(rows) == len(tokenizer.encode("The quick brown fox", add_special_tokens=True))
    for row in rows[1:]:
        assert len(row) == 320  # every token, ranks 1..V
        assert sorted(e["rank"] for e in row.values()) == list(range(1, 321))
        assert sum(np.exp(e["logprob"]) for e in row.values()) == pytest.approx(1, abs=1e-4)
    assert choice["logprobs"] is None and r.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("body, needle", [
    ({"prompt": []}, "prompt: empty"),
    ({"prompt": [1, 2, 320]}, "token id 320 is outside the vocabulary (320 ids)"),
    ({"prompt": [1, 2], "stream": True}, "stream: not supported"),
    ({"prompt": [1, 2], "prompt_logprobs": -2}, "prompt_logprobs"),
    ({"prompt": [1, 2], "prompt_logprobs": 321}, "prompt_logprobs: at most the vocabulary (320)"),
    ({"prompt": [1, 2], "max_tokens": 2047}, "limit of 2048"),
    ({"max_tokens": 2}, "prompt"),
])
def test_bad_completions_requests_get_400(server, body, needle):
    _, client = server
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]


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
        assert client.post("/v1/completions", json={"prompt": [1]}).status_code == 401
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


# ------------------------------------------------------------------ the command line


def test_cli_help():
    proc = invoke_cli(["serve", "--help"])
    assert proc.returncode == 0
    for needle in ("/v1/chat/completions", "/v1/completions", "prompt_logprobs", "--host", "--port", "--slots", "--max-len",
                   "--no-warmup", "--api-key-env"):
        assert needle in proc.stdout
    assert "--fault-rate" not in proc.stdout and "--max-batch" not in proc.stdout


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


def test_clients_that_leave_free_their_slot(toy_qwen2):
    app = build_app(*toy_qwen2, "toy", config=EngineConfig(slots=1))
    jobs = app.state.jobs
    # compiled here, as `distill serve` does before it listens: late in the full suite, XLA's
    # compile of the widest decode windows on the engine's thread crashed the process (SIGSEGV
    # in backend_compile_and_load, twice on CI's clean clone; never alone or in its module)
    jobs.engine.warmup(logprobs=False)
    long = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1536,
            "temperature": 0}
    with ServerThread(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        whole = client.post("/v1/chat/completions", json=long).json()
        assert whole["usage"]["completion_tokens"] == 1536  # greedy: the same request runs this long
        before = jobs.tokens_generated
        # a streaming client reads its first delta and hangs up: its slot frees at the next visit
        with client.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as r:
            first_text = next(x for x in r.iter_lines() if x and '"role"' not in x)
        assert '"delta"' in first_text  # the request was decoding when the client left
        assert _wait_until(lambda: jobs.requests_cancelled == 1 and jobs.requests_done == 1)
        assert jobs.tokens_generated - before < 1536 // 2
        # a plain client gives up while its request waits for the one slot: it never runs
        runner = threading.Thread(target=lambda: client.post("/v1/chat/completions", json=long))
        runner.start()
        while jobs.engine.pending or not any(jobs.engine.slots):
            time.sleep(0.01)  # the long request holds the slot
        tokens = jobs.tokens_generated
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/chat/completions", json=long, timeout=0.3)
        assert _wait_until(lambda: jobs.requests_cancelled == 2)  # noticed within DISCONNECT_POLL_S
        assert jobs.engine.pending == 0
        runner.join()
        assert jobs.requests_done == 2 and jobs.tokens_generated == tokens + 1536
        assert chat(client).status_code == 200
