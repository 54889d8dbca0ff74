"""Teacher scoring: `score_sequences` against a plain unbatched log-softmax of the model (dense and
DeepSeek-V3 MoE), batch composition, bounded compiles; the scorers (in process, `distill serve`,
the vLLM and SGLang answer shapes) agreeing on the same arrays."""

import copy
import json
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

import distill
from distill.backends import make_scorer
from distill.backends.http import OpenAISamplerConfig, OpenAIScorer
from distill.backends.jax import JaxSamplerConfig, JaxScorer
from distill.backends.prompt_logprobs import parse_sglang, parse_vllm, sglang_body, vllm_body
from distill.backends.spans import SpanScorer
from distill.chat import R1_DISTILL_CHAT_TEMPLATE
from distill.data.records import PromptRecord
from distill.errors import DistillError
from distill.inference import EngineConfig, TokenScores, compiles, score_sequences
from distill.serve.app import ServerThread, build_app
from distill.tokenizer import Tokenizer
from tests import vocabularies

PROMPTS = [[5, 17, 200, 31], [9], [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60],
           [3, 3]]
COMPLETIONS = [[12, 99, 1], [300, 301, 2, 7, 7, 7], [100], [250, 251, 252, 253, 254, 255, 256, 257,
                                                          258, 259, 260, 261, 262, 263, 264, 265,
                                                          266, 267]]


@pytest.fixture(scope="module")
def moe(teacher_dir):
    return distill.load_pretrained(teacher_dir)


def plain(model, prompt, completion):
    """log_softmax(model(ids)) of one unpadded row at the completion's positions [C, V]."""
    ids = np.asarray([[*prompt, *completion]], np.int32)
    logp = np.asarray(jax.nn.log_softmax(model(ids)[0].astype(np.float32), axis=-1))
    return logp[len(prompt) - 1:len(ids[0]) - 1]


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_scores_equal_a_plain_log_softmax_of_each_row(which, toy_qwen2, moe):
    model = toy_qwen2[0] if which == "dense" else moe[0]
    full = score_sequences(model, PROMPTS, COMPLETIONS, None, batch_rows=4)
    top = score_sequences(model, PROMPTS, COMPLETIONS, 5, batch_rows=4)
    only = score_sequences(model, PROMPTS, COMPLETIONS)
    for p, c, f, t, o in zip(PROMPTS, COMPLETIONS, full, top, only, strict=True):
        ref = plain(model, p, c)
        taken = ref[np.arange(len(c)), c]
        np.testing.assert_allclose(o.logprobs, taken, atol=1e-6, rtol=0)
        assert o.top_ids is None and o.top_logprobs is None and o.logprobs.dtype == np.float32
        np.testing.assert_allclose(f.logprobs, taken, atol=1e-6, rtol=0)
        np.testing.assert_allclose(f.top_logprobs, ref, atol=1e-6, rtol=0)
        assert f.top_ids.shape == ref.shape and (f.top_ids == np.arange(ref.shape[1])).all()
        np.testing.assert_allclose(t.top_logprobs, np.sort(ref, axis=1)[:, ::-1][:, :5], atol=1e-6)
        np.testing.assert_allclose(np.take_along_axis(ref, t.top_ids, 1), t.top_logprobs, atol=1e-6)
        assert t.top_ids.dtype == np.int32 and t.top_logprobs.dtype == np.float32


def test_a_row_scores_the_same_alone_and_beside_others(toy_qwen2):
    model = toy_qwen2[0]
    together = score_sequences(model, PROMPTS, COMPLETIONS, 3, batch_rows=4)
    for i in range(len(PROMPTS)):
        [alone] = score_sequences(model, PROMPTS[i:i + 1], COMPLETIONS[i:i + 1], 3)
        np.testing.assert_allclose(alone.logprobs, together[i].logprobs, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(alone.top_ids, together[i].top_ids)


def test_scoring_compiles_a_bounded_number_of_programs(toy_qwen2):
    model = toy_qwen2[0]
    rng = np.random.RandomState(0)

    def batch(n):
        lengths = rng.randint(1, 15, (n, 2))
        return ([list(rng.randint(0, 300, a)) for a, _ in lengths],
                [list(rng.randint(0, 300, b)) for _, b in lengths])

    score_sequences(model, [[1] * 4] * 4, [[2]] * 4, 2, batch_rows=4)  # 4 rows of 16
    score_sequences(model, [[1] * 20] * 4, [[2] * 10] * 4, 2, batch_rows=4)  # 4 rows of 32
    before = compiles()
    for _ in range(3):  # rows of 2..28 tokens in groups of 4 and 3 (a 4-row bucket)
        score_sequences(model, *batch(7), 2, batch_rows=4)
    assert compiles() == before


def test_empty_completions_and_bad_input(toy_qwen2):
    model = toy_qwen2[0]
    [s] = score_sequences(model, [[4, 5]], [[]], 3)
    assert s.logprobs.shape == (0,) and s.top_ids.shape == (0, 3)
    assert score_sequences(model, [], []) == []
    with pytest.raises(DistillError, match="empty prompt"):
        score_sequences(model, [[]], [[1]])
    with pytest.raises(DistillError, match="past the model's context"):
        score_sequences(model, [[1] * 3000], [[1]])
    with pytest.raises(DistillError, match="top_k"):
        score_sequences(model, [[1]], [[1]], 10_000)


# ------------------------------------------------------------------ served answers (fixtures)

FIXTURES = Path(__file__).parent / "fixtures"
SHAPES = {"vllm": "vllm_prompt_logprobs.json", "sglang": "sglang_input_logprobs.json"}


def fixture(scoring):
    return json.loads((FIXTURES / SHAPES[scoring]).read_text())


@pytest.mark.parametrize("scoring", ["vllm", "sglang"])
def test_the_documented_answer_shapes_parse(scoring):
    """Both fixtures hold the same numbers in their server's shape: completion [17, 200] after the
    prompt [0, 45], top 2 entries per position."""
    fx = fixture(scoring)
    parse = parse_vllm if scoring == "vllm" else parse_sglang
    p, ids = fx["prompt_tokens"], (fx["request"].get("prompt") or fx["request"].get("input_ids"))
    for k in (0, 2, 1):
        s = parse(fx["response"], p, ids[p:], k, "http://x")
        np.testing.assert_array_equal(s.logprobs, np.float32([-2.5, -0.25]))
        if k:
            np.testing.assert_array_equal(s.top_ids, np.int32([[5, 88], [200, 31]])[:, :k])
            np.testing.assert_array_equal(s.top_logprobs,
                                          np.float32([[-0.75, -1.5], [-0.25, -2.0]])[:, :k])
        else:
            assert s.top_ids is None
    body = (vllm_body("toy", ids, 2) if scoring == "vllm" else sglang_body(ids, 2, None))
    assert body == fx["request"]  # what the scorer asks is the request the fixture answers


def vllm_answer(template, ids, logp_tv, k, tokenizer):
    """`template` (the vLLM fixture) with our model's numbers for prompt `ids` ([T-1, V] rows)."""
    answer = copy.deepcopy(template)
    rows = [None]
    for t, row in enumerate(logp_tv):
        token = ids[t + 1]
        top = np.argsort(-row, kind="stable")[:k] if k >= 0 else np.arange(len(row))
        entries = {int(i): r + 1 for r, i in enumerate(top)}
        entries.setdefault(token, int((row >= row[token]).sum()))
        rows.append({str(i): {"logprob": float(row[i]), "rank": rank,
                              "decoded_token": tokenizer.decode([i])}
                     for i, rank in entries.items()})
    answer["choices"][0]["prompt_logprobs"] = rows
    answer["usage"].update(prompt_tokens=len(ids), total_tokens=len(ids) + 1)
    return answer


def sglang_answer(template, ids, logp_tv, k):
    answer = copy.deepcopy(template)
    meta = answer["meta_info"]
    meta["input_token_logprobs"] = [[None, ids[0], None]] + [
        [float(row[ids[t + 1]]), ids[t + 1], None] for t, row in enumerate(logp_tv)]
    meta["input_top_logprobs"] = [None] + [
        [[float(row[i]), int(i), None] for i in np.argsort(-row, kind="stable")[:k]]
        for row in logp_tv]
    meta["prompt_tokens"] = len(ids)
    return answer


@pytest.fixture(scope="module")
def served_by_mock(toy_qwen2):
    """A transport answering vLLM's and SGLang's scoring requests in the fixtures' shapes with
    the toy model's numbers; `calls` counts requests."""
    model, tokenizer = toy_qwen2
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        calls.append(request.url.path)
        vllm = request.url.path == "/v1/completions"
        ids = body["prompt"] if vllm else body["input_ids"]
        [full] = score_sequences(model, [ids[:1]], [ids[1:]], None)
        if vllm:
            data = vllm_answer(fixture("vllm")["response"], ids, full.top_logprobs,
                               body["prompt_logprobs"], tokenizer)
        else:
            data = sglang_answer(fixture("sglang")["response"], ids, full.top_logprobs,
                                 body["top_logprobs_num"])
        return httpx.Response(200, json=data)

    return httpx.MockTransport(handler), calls


def jax_scorer(toy_qwen2, toy_qwen2_dir):
    return JaxScorer(JaxSamplerConfig(model=str(toy_qwen2_dir)), model=toy_qwen2[0],
                     tokenizer=toy_qwen2[1])


def assert_same_scores(got, want, atol):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=atol, rtol=0)
        assert (g.top_ids is None) == (w.top_ids is None)
        if w.top_ids is not None:
            np.testing.assert_array_equal(g.top_ids, w.top_ids)
            np.testing.assert_allclose(g.top_logprobs, w.top_logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("scoring", ["vllm", "sglang"])
def test_served_answers_parse_into_the_in_process_scores(scoring, served_by_mock, toy_qwen2,
                                                         toy_qwen2_dir):
    transport, calls = served_by_mock
    calls.clear()
    scorer = OpenAIScorer(OpenAISamplerConfig(base_url="http://teacher.test/v1", model="toy",
                                              scoring=scoring, concurrency=3),
                          transport=transport)
    local = jax_scorer(toy_qwen2, toy_qwen2_dir)
    for k in (0, 4, None) if scoring == "vllm" else (0, 4):
        assert_same_scores(scorer.score(PROMPTS, COMPLETIONS, k),
                           local.score(PROMPTS, COMPLETIONS, k), atol=1e-6)
    assert set(calls) == {"/v1/completions" if scoring == "vllm" else "/generate"}
    scorer.close()


@pytest.mark.parametrize("scoring, answer, why", [
    ("vllm", {"choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}]},
     r"http://teacher.test/v1/completions: the answer has no prompt_logprobs.*vLLM extension"),
    ("sglang", {"text": "x", "meta_info": {"prompt_tokens": 4}},
     r"http://teacher.test/generate: the answer has no meta_info.input_token_logprobs.*"
     "return_logprob"),
])
def test_a_server_that_cannot_score_is_one_line_at_the_first_request(scoring, answer, why):
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(200, json=answer)

    scorer = OpenAIScorer(OpenAISamplerConfig(base_url="http://teacher.test/v1", model="m",
                                              scoring=scoring),
                          transport=httpx.MockTransport(handler))
    with pytest.raises(DistillError, match=why) as e:
        scorer.score(PROMPTS, COMPLETIONS, 2)
    assert "\n" not in str(e.value) and len(calls) == 1  # the probe alone went


def test_a_server_without_the_endpoint_is_told_what_scoring_needs():
    scorer = OpenAIScorer(OpenAISamplerConfig(base_url="http://teacher.test", model="m"),
                          transport=httpx.MockTransport(lambda r: httpx.Response(
                              404, json={"detail": "Not Found"})))
    with pytest.raises(DistillError, match=r"^http://teacher.test/v1/completions: HTTP 404: Not "
                                           r"Found \(scoring needs prompt log-probabilities"):
        scorer.score(PROMPTS[:1], COMPLETIONS[:1])


def test_make_scorer_opens_each_backends_scorer(toy_qwen2_dir):
    from distill.backends import BACKENDS, Scorer, make_scorer

    local = make_scorer(BACKENDS["jax"].config(model=str(toy_qwen2_dir)))
    served = make_scorer(BACKENDS["openai"].config(base_url="http://127.0.0.1:9/v1", model="m",
                                                   scoring="sglang"))
    assert isinstance(local, Scorer) and isinstance(served, Scorer)
    assert local.vocab_size == 320 and served.vocab_size is None
    assert served.url == "http://127.0.0.1:9/generate" and served.identity["scoring"] == "sglang"
    [s] = local.score([[3, 4]], [[5, 6, 7]], 2)
    assert s.logprobs.shape == (3,) and s.top_ids.shape == (3, 2)
    served.close()
    local.close()


def test_distill_serve_scores_as_the_in_process_teacher(toy_qwen2, toy_qwen2_dir):
    """A real `distill serve` of ours, asked through the vLLM request, gives the in-process
    teacher's numbers (issue 29's served-teacher target: within 1e-5)."""
    app = build_app(*toy_qwen2, "toy", config=EngineConfig(slots=2, max_len=64))
    local = jax_scorer(toy_qwen2, toy_qwen2_dir)
    with ServerThread(app) as base_url:
        scorer = make_scorer(OpenAISamplerConfig(base_url=f"{base_url}/v1", model="toy",
                                                 scoring="vllm", concurrency=2))
        for k in (0, 4, None):
            assert_same_scores(scorer.score(PROMPTS, COMPLETIONS, k),
                               local.score(PROMPTS, COMPLETIONS, k), atol=1e-5)
        scorer.close()


# ------------------------------------------------------------------ across tokenizers (spans)

COMPLETION_TEXT = ("<think>\nWe need 12 * 34. 12 * 34 = 408, and 408 — checked: ✅ 日本 café.\n"
                   "</think>\n\nThe answer is $\\boxed{408}$.")


class FakeScorer:
    """A Scorer whose log-prob of a teacher token is a known dyadic number of its id (sums are
    exact in any order); it keeps what it was asked."""

    identity, tokenizer_identity, vocab_size = {"kind": "fake"}, None, None

    def __init__(self):
        self.asked = []

    @staticmethod
    def value(token_id: int) -> float:
        return -((token_id % 13) + 1) / 16

    def score(self, prompts, completions, top_k=0):
        self.asked.append((prompts, completions))
        return [TokenScores(np.float32([self.value(t) for t in c])) for c in completions]

    def close(self):
        pass


def with_template(tokenizer, template):
    return Tokenizer(tokenizer.backend, tokenizer.special_tokens_map, template)


def check_spans(got, student_ids, kept_from, student, teacher_ids, teacher):
    """Every span's sum is the fake log-probs of exactly the teacher tokens whose bytes are the
    span's student tokens' bytes; template-only tokens (before kept_from, EOS) have none."""
    s_bytes, t_bytes = student.token_bytes(), teacher.token_bytes()
    assert (got.span_of_token[:kept_from] == -1).all()
    kept = np.flatnonzero(got.span_of_token >= 0)
    spans = got.span_of_token[kept]
    assert (np.diff(spans) >= 0).all() and spans[0] == 0 and len(got.teacher_logprobs) == spans[-1] + 1
    t_ends = np.cumsum([len(t_bytes[i]) for i in teacher_ids])
    at = 0
    for g in range(len(got.teacher_logprobs)):
        run = kept[spans == g]
        assert (np.diff(run) == 1).all()  # a span is a run of student tokens
        text = b"".join(s_bytes[student_ids[j]] for j in run)
        inside = [k for k, end in enumerate(t_ends) if at < end <= at + len(text)]
        assert b"".join(t_bytes[teacher_ids[k]] for k in inside) == text
        assert got.teacher_logprobs[g] == sum(FakeScorer.value(teacher_ids[k]) for k in inside)
        at += len(text)
    assert at == t_ends[-1]  # every teacher token is in a span


def test_spans_from_deepseek_v3_teaching_a_qwen25_student():
    teacher, student = vocabularies.deepseek_r1(), vocabularies.qwen25()
    completion = student.encode(COMPLETION_TEXT) + [student.eos_token_id]
    fake = FakeScorer()
    [got] = SpanScorer(fake, teacher, student).score([PromptRecord("p", "What is 12 * 34?")],
                                                     [completion])
    [(prompts, completions)] = fake.asked
    assert prompts == [teacher.encode(teacher.apply_chat_template(
        [{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True))]
    assert completions == [teacher.encode(COMPLETION_TEXT)]  # re-tokenized, EOS left out
    assert got.span_of_token[-1] == -1 and len(got.span_of_token) == len(completion)
    assert 10 < len(got.teacher_logprobs) < len(completion)  # some spans hold several tokens
    check_spans(got, completion, 0, student, completions[0], teacher)


def test_a_think_tag_the_teachers_prompt_opened_is_template_only():
    """A Qwen2.5-vocabulary teacher with the R1 template (its generation prompt ends with
    `<think>\\n`) scoring a DeepSeek-vocabulary student that wrote the tag itself."""
    teacher = with_template(vocabularies.qwen25(), R1_DISTILL_CHAT_TEMPLATE)
    student = vocabularies.deepseek_r1()
    completion = student.encode(COMPLETION_TEXT) + [student.eos_token_id]
    opened = len(student.encode("<think>\n"))
    fake = FakeScorer()
    [got] = SpanScorer(fake, teacher, student).score([PromptRecord("p", "What is 12 * 34?")],
                                                     [completion])
    [(prompts, [teacher_ids])] = fake.asked
    assert teacher.decode(prompts[0]).endswith("<think>\n")
    assert teacher_ids == teacher.encode(COMPLETION_TEXT.removeprefix("<think>\n"))
    assert (got.span_of_token[:opened] == -1).all() and got.span_of_token[opened] == 0
    check_spans(got, completion, opened, student, teacher_ids, teacher)


def test_one_tokenizer_gives_one_span_per_token():
    tokenizer = vocabularies.deepseek_r1()
    completion = tokenizer.encode(COMPLETION_TEXT) + [tokenizer.eos_token_id]
    [got] = SpanScorer(FakeScorer(), tokenizer, tokenizer).score(
        [PromptRecord("p", "What is 12 * 34?")], [completion])
    np.testing.assert_array_equal(got.span_of_token, np.arange(len(completion)))
    np.testing.assert_array_equal(got.teacher_logprobs,
                                  np.float32([FakeScorer.value(t) for t in completion]))


def test_a_completion_cut_inside_a_character_scores_what_decodes():
    teacher, student = vocabularies.deepseek_r1(), vocabularies.qwen25()
    # a sample that ended after two of the three bytes of "日" (byte tokens)
    ids = student.encode("Answer: ") + [student.ids_by_bytes()[bytes([b])] for b in "日".encode()][:2]
    fake = FakeScorer()
    [got] = SpanScorer(fake, teacher, student).score([PromptRecord("p", "q")], [ids])
    assert (got.span_of_token[-2:] == -1).all() and (got.span_of_token[:-2] >= 0).all()
    assert fake.asked[0][1] == [teacher.encode("Answer: ")]


def test_a_sharded_teacher_scores_as_a_single_device_one(toy_qwen2, toy_qwen2_dir, teacher_dir,
                                                          moe):
    """JaxScorer on a mesh of the 8 fake devices (the MoE's experts sharded too) gives the
    single-device numbers."""
    for path, model, mesh in ((toy_qwen2_dir, toy_qwen2[0], "data=2,fsdp=2,tensor=2"),
                              (teacher_dir, moe[0], "data=1,fsdp=2,tensor=1,expert=4")):
        sharded = JaxScorer(JaxSamplerConfig(model=str(path), mesh=mesh))
        assert len(jax.tree.leaves(sharded.model)[0].sharding.device_set) > 1
        assert_same_scores(sharded.score(PROMPTS, COMPLETIONS, 3),
                           score_sequences(model, PROMPTS, COMPLETIONS, 3), atol=1e-5)
