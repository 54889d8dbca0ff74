"""Logit distillation across tokenizers, the data side: traces keep the bytes of the teacher's
tokens, rendering aligns them to the student's (DeepSeek-V3/R1's vocabulary teaching SmolLM2's),
the same tokenizer gives exactly today's rows, and a loss that cannot use the traces is one
clear error before anything is built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.chat import completion_text
from distill.data.render import render_texts, render_traces
from distill.data.traces import Trace
from distill.errors import DistillError
from distill.tokenizer import Tokenizer, tokenizer_identity
from distill.traces.store import TraceStore
from distill.train.config import LossConfig
from distill.train.teacher_vocab import check_teacher_vocabulary
from tests import vocabularies

K = 4
REPO = Path(__file__).resolve().parents[1]
REASONING = "We need 12 * 34. 12 * 34 = 408, and 408 — checked: ✅ 日本."
ANSWER = "The answer is $\\boxed{408}$."


def _trace(teacher: Tokenizer, text: str, seed: int = 0) -> Trace:
    """A trace as `distill generate` stores it from `teacher`: per sampled token of `text`, the
    top-K entries (the sampled token first), their log-probabilities and their bytes."""
    rng = np.random.default_rng(seed)
    sampled = teacher.encode(text)
    top = np.stack([[i, *rng.choice(teacher.vocab_size, K - 1, replace=False)] for i in sampled])
    lps = np.sort(np.log(rng.dirichlet(np.ones(K + 1), len(sampled))[:, :K]), axis=1)[:, ::-1]
    table = teacher.token_bytes()
    return Trace(id="t0", prompt_id="p0", prompt="What is 12 * 34?", reasoning=REASONING,
                 answer=ANSWER, top_ids=top.astype(np.int32), top_logprobs=lps.astype(np.float32),
                 token_bytes=[table[i] for i in sampled],
                 top_bytes=[[table[i] for i in row] for row in top])


def test_one_tokenizer_gives_the_same_rows_by_bytes_as_by_ids(smollm2_tokenizer):
    trace = _trace(smollm2_tokenizer,
                   render_texts(smollm2_tokenizer, "What is 12 * 34?", REASONING, ANSWER)[1])
    by_ids = Trace(**{**trace.__dict__, "token_bytes": None, "top_bytes": None})
    (a,), (b,) = (render_traces(smollm2_tokenizer, [trace], K),
                  render_traces(smollm2_tokenizer, [by_ids], K))
    assert a.teacher_error is None and b.teacher_error is None
    n = len(b.top_ids)  # the teacher stopped before scoring EOS; by bytes, EOS has a row of none
    assert len(a.top_ids) == n + 1 and not np.isfinite(a.top_logprobs[n].astype(np.float32)).any()
    np.testing.assert_array_equal(a.top_ids[:n], b.top_ids)
    np.testing.assert_array_equal(a.top_logprobs[:n], b.top_logprobs)


def test_deepseek_teacher_rows_land_on_the_first_student_token_of_each_span(smollm2_tokenizer):
    """The teacher's completion lacks the `<think>\\n` SmolLM2's ChatML template puts in the
    student's completion: those student tokens get no entries."""
    teacher = vocabularies.deepseek_r1()
    trace = _trace(teacher, completion_text(REASONING, ANSWER))
    (r,) = render_traces(smollm2_tokenizer, [trace], K)
    assert r.teacher_error is None
    completion = r.ids[r.first:-1]
    s_bytes, t_bytes = smollm2_tokenizer.token_bytes(), teacher.token_bytes()
    has = np.isfinite(r.top_logprobs.astype(np.float32)).any(1)
    assert len(r.top_ids) == len(completion) + 1 and not has[-1]  # EOS: no teacher entry
    think = len(smollm2_tokenizer.encode("<think>\n"))
    assert not has[:think].any() and has[think]
    # a row at each student token where both sides start a token at the same byte
    s_starts = np.cumsum([0] + [len(s_bytes[i]) for i in completion[think:]])[:-1]
    t_starts = set(np.cumsum([0] + [len(b) for b in trace.token_bytes])[:-1].tolist())
    np.testing.assert_array_equal(has[think:-1], [s in t_starts for s in s_starts])
    assert 0 < has.sum() < len(completion) - think  # some spans merge tokens
    # each entry is the student token spelling the teacher entry's bytes, or the id type's
    # largest (unmatched: 65535 for SmolLM2's uint16 ids, past its 49,152)
    rows = iter(np.flatnonzero(np.isin(np.cumsum([0] + [len(b) for b in trace.token_bytes])[:-1],
                                       s_starts)))
    unmatched = 0
    for j in np.flatnonzero(has):
        t_row = next(rows)
        want = {t_bytes[i]: lp for i, lp in zip(trace.top_ids[t_row], trace.top_logprobs[t_row],
                                                strict=True)}
        for sid, lp in zip(r.top_ids[j], r.top_logprobs[j].astype(np.float32), strict=True):
            if sid == np.iinfo(r.top_ids.dtype).max:
                unmatched += 1
                continue
            assert np.isclose(want[s_bytes[sid]], lp, rtol=1e-3)
    assert unmatched > 0


def test_texts_that_differ_make_the_trace_misaligned(smollm2_tokenizer):
    trace = _trace(vocabularies.deepseek_r1(), completion_text(REASONING, ANSWER + " Extra."))
    (r,) = render_traces(smollm2_tokenizer, [trace], K, name="set")
    assert r.top_ids is None and "set: trace t0: the teacher's and the student's tokens spell "\
        "different texts" in r.teacher_error


def _run(tmp_path, teacher: Tokenizer | None, with_bytes: bool):
    run = tmp_path / ("run-bytes" if with_bytes else "run-ids")
    if run.exists():
        return str(run)
    store = TraceStore.open(run, {"test": "vocab"})
    if teacher is not None:
        store.set_info(tokenizer=tokenizer_identity(teacher, "teacher-dir"))
    row = {"id": "a", "prompt_id": "p", "top_ids": [[1, 2]], "top_logprobs": [[-0.1, -2.0]]}
    if with_bytes:
        row |= {"token_bytes": [b"a"], "top_bytes": [[b"a", b"b"]]}
    store.add_shard(0, [row], {"prompts": 1, "samples": 1, "rejected": {}, "prompt_tokens": 1,
                               "completion_tokens": 1})
    return str(run)


def test_a_loss_that_cannot_use_the_traces_is_one_line(tmp_path, smollm2_tokenizer):
    deepseek = vocabularies.deepseek_r1()
    gold, kl = LossConfig(kind="gold", alpha=0.5), LossConfig(kind="forward_kl", alpha=0.5)
    with pytest.raises(DistillError, match=r"run-ids: the teacher's tokenizer \(teacher-dir, "
                                           r"128815 ids\) is not the student's \(49152 ids\).*"
                                           r"set loss.kind gold or uld"):
        check_teacher_vocabulary([_run(tmp_path, deepseek, False)], smollm2_tokenizer, kl, K)
    with pytest.raises(DistillError, match=r"loss gold distils across tokenizers through the "
                                           r"bytes of the teacher's tokens, and these traces "
                                           r"keep none \("):
        check_teacher_vocabulary([_run(tmp_path, deepseek, False)], smollm2_tokenizer, gold, K)
    with pytest.raises(DistillError, match="keep none, nor do they name the teacher's tokenizer"):
        check_teacher_vocabulary([_run(tmp_path / "x", None, False)], smollm2_tokenizer, gold, K)
    # what can work passes: bytes kept, or one tokenizer, or no teacher term
    check_teacher_vocabulary([_run(tmp_path / "y", deepseek, True)], smollm2_tokenizer, gold, K)
    check_teacher_vocabulary([_run(tmp_path / "z", smollm2_tokenizer, False)], smollm2_tokenizer,
                             kl, K)
    check_teacher_vocabulary([_run(tmp_path / "w", deepseek, False)], smollm2_tokenizer,
                             LossConfig(kind="sft"), 0)


def test_distill_train_says_it_in_one_line_and_exits_2(tmp_path):
    """The tiny student with a tokenizer of its own, on traces of a DeepSeek-tokenizer teacher."""
    import yaml

    from tests import toy
    from tests.helpers import assert_user_error, invoke_cli

    traces = _run(tmp_path, vocabularies.deepseek_r1(), with_bytes=False)
    for kind, needle in (("forward_kl", "is not the student's (320 ids)"),
                         ("gold", "these traces keep none")):
        cfg = tmp_path / f"{kind}.yaml"
        cfg.write_text(yaml.safe_dump({
            "student": {"init": str(REPO / "configs/students/tiny-qwen2.yaml"),
                        "tokenizer": str(toy.write_tokenizer(tmp_path / "student-tok"))},
            "data": {"traces": [traces], "seq_len": 64, "batch_size": 8, "top_k": K},
            "loss": {"kind": kind, "alpha": 0.5}, "output_root": str(tmp_path / "out")}))
        assert_user_error(invoke_cli(["train", cfg]), needle)
