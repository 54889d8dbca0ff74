"""Teacher scoring: `score_sequences` against a plain unbatched log-softmax of the model (dense and
DeepSeek-V3 MoE), batch composition, bounded compiles; the scorers (in process, `distill serve`,
the vLLM and SGLang answer shapes) agreeing on the same arrays."""

import jax
import numpy as np
import pytest

import distill
from distill.errors import DistillError
from distill.inference import compiles, score_sequences

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
