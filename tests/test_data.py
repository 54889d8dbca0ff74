"""Training data: R1-style rendering and loss masks, packing (segments, positions, targets,
efficiency, isolation of packed documents in the student), resumable order, multi-host shares,
mixture weights, teacher top-k alignment and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from distill.chat import prompt_ids
from distill.config import validate
from distill.data.packing import Documents, build_rows, pack
from distill.data.render import render_example
from distill.data.traces import read_traces
from distill.errors import DistillError
from distill.models.families import load_model_config
from distill.pretrained import init_model
from distill.tokenizer import Tokenizer
from distill.train.data import DataConfig, DataState, StreamConfig, TrainData

from . import toy
from .trace_rows import trace_row, with_teacher, write_traces

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{'<|im_start|>assistant\\n'}}{% endif %}")


@pytest.fixture(scope="module")
def traces_dir(tmp_path_factory) -> Path:
    """300 traces of 1..21 reasoning steps (about 95..490 tokens), 10% marked wrong."""
    rows = [trace_row(i, 1 + i * 8 % 21, correct=i % 10 != 3) for i in range(300)]
    return write_traces(tmp_path_factory.mktemp("traces") / "run", rows)


# --------------------------------------------------------------------------------- rendering


def test_render_is_the_inference_prompt_then_the_completion(tok):
    prompt = "Start with 7. Add 3, then multiply by 2. What is the result?"
    ids, mask = render_example(tok, prompt, "  7 + 3 = 10\n10 * 2 = 20\n", "\\boxed{20}")
    at_inference = prompt_ids(tok, prompt)  # what `distill sample` feeds the model
    assert ids[:len(at_inference)].tolist() == at_inference
    assert not mask[:len(at_inference)].any() and mask[len(at_inference):].all()
    completion = "7 + 3 = 10\n10 * 2 = 20\n</think>\n\n\\boxed{20}" + toy.EOS
    generation_prompt = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True)
    assert generation_prompt.endswith("<｜Assistant｜><think>\n")
    assert tok.decode(ids) == generation_prompt + completion
    assert tok.decode(ids[mask]) == completion
    assert ids[-1] == tok.eos_token_id


def test_render_chat_messages_and_a_template_without_think(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    ids, mask = render_example(tok, messages, "2+2=4", "4")
    assert tok.decode(ids[~mask]) == tok.apply_chat_template(messages, add_generation_prompt=True)
    plain = Tokenizer(tok.backend, tok.special_tokens_map, CHATML)  # generation prompt: no <think>
    ids, mask = render_example(plain, messages, "2+2=4", "4")
    assert tok.decode(ids[~mask]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[mask]) == "<think>\n2+2=4\n</think>\n\n4" + toy.EOS


def test_render_with_no_assistant_text_is_an_error(tok):
    with pytest.raises(DistillError, match="^no assistant text"):
        render_example(tok, "hi", " \n", "")


# --------------------------------------------------------------------------------- packing


def test_pack_hand_case():
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], bool))  # 3 slots
    b = (np.array([20, 21, 22]), np.array([0, 1, 1], bool))  # 2 slots
    c = (np.array([30, 31, 32, 33, 34, 35]), np.array([0, 0, 0, 1, 1, 1], bool))  # 5 slots
    rows, stats, counts = pack([a, b, c], seq_len=8, pad_id=7)
    # best fit, longest first: c then a fill row 0 exactly; b opens row 1
    np.testing.assert_array_equal(rows["tokens_bt"], [[30, 31, 32, 33, 34, 10, 11, 12],
                                                      [20, 21, 7, 7, 7, 7, 7, 7]])
    np.testing.assert_array_equal(rows["targets_bt"], [[31, 32, 33, 34, 35, 11, 12, 13],
                                                       [21, 22, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["loss_mask_bt"], [[0, 0, 1, 1, 1, 0, 1, 1],
                                                          [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids_bt"], [[1, 1, 1, 1, 1, 2, 2, 2],
                                                           [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions_bt"], [[0, 1, 2, 3, 4, 0, 1, 2],
                                                         [0, 1, 0, 0, 0, 0, 0, 0]])
    assert (stats.rows, stats.slots, stats.efficiency) == (2, 10, 10 / 16)
    assert counts == {"documents": 3, "dropped_overlong": 0, "truncated": 0}


def test_overlong_documents_are_dropped_or_truncated_and_counted():
    long = (np.arange(12), np.array([0] * 3 + [1] * 9, bool))  # 11 slots
    short = (np.arange(5), np.array([0, 1, 1, 1, 1], bool))
    rows, _, counts = pack([long, short], seq_len=8, policy="drop")
    assert counts == {"documents": 1, "dropped_overlong": 1, "truncated": 0}
    assert rows["segment_ids_bt"].max() == 1 and rows["tokens_bt"].shape == (1, 8)
    rows, _, counts = pack([long, short], seq_len=8, policy="truncate")
    assert counts == {"documents": 2, "dropped_overlong": 0, "truncated": 1}
    full = rows["segment_ids_bt"].min(axis=1) == 1
    np.testing.assert_array_equal(rows["tokens_bt"][full][0], np.arange(8))
    np.testing.assert_array_equal(rows["targets_bt"][full][0], np.arange(1, 9))


def test_packing_efficiency_on_synthetic_traces(traces_dir, tok):
    data = TrainData.from_mixture(read_traces([traces_dir], keep="all"), tok,
                                  StreamConfig(seq_len=512, batch_size=8))
    stats = data.pack_stats(epoch=0)
    print(f"\npacking efficiency on {data.counts.documents} synthetic traces at seq_len 512: "
          f"{stats.efficiency:.2%} ({stats.rows} rows)")
    lengths = np.diff(data.docs.offsets)
    assert lengths.min() < 100 and lengths.max() > 400  # the case is not trivially uniform
    assert data.counts.documents == 300 and stats.efficiency >= 0.95


def test_every_document_is_packed_once_with_its_loss_mask(traces_dir, tok):
    data = TrainData.from_mixture(read_traces([traces_dir], keep="all"), tok,
                                  StreamConfig(seq_len=512, batch_size=8))
    rows = data.epoch_rows(0)
    assert sorted(d for r in rows for d in r) == list(range(data.counts.documents))
    batch = build_rows(data.docs, rows, 512)
    completion_tokens = sum(int(data.docs.doc(d)[1].sum()) for d in range(len(data.docs)))
    assert batch["loss_mask_bt"].sum() == completion_tokens
    # the last target of every document is its EOS, and nothing after a document is a target
    ends = np.diff(batch["segment_ids_bt"], axis=1, append=0) != 0
    assert np.all(batch["targets_bt"][ends & (batch["segment_ids_bt"] > 0)] == tok.eos_token_id)
    assert not batch["loss_mask_bt"][batch["segment_ids_bt"] == 0].any()


def test_changing_one_packed_document_leaves_the_others_logits(tok):
    cfg = load_model_config(ROOT / "configs/students/tiny-qwen2.yaml")
    model = init_model(cfg, seed=0)
    docs = [render_example(tok, q, r, "\\boxed{1}") for q, r in
            [("What is 1 + 0?", "1 + 0 = 1"), ("Start with 7.", "7 - 6 = 1"), ("1 * 1?", "ok")]]
    changed = list(docs)
    ids, mask = changed[1]
    changed[1] = (np.where(mask, (ids * 7 + 3) % 300, ids), mask)  # same length, other tokens
    forward = nnx.jit(lambda m, b: m(b["tokens_bt"], b["positions_bt"], b["segment_ids_bt"]))
    first = build_rows(Documents.build(docs), [[0, 1, 2]], 128)
    second = build_rows(Documents.build(changed), [[0, 1, 2]], 128)
    seg = first["segment_ids_bt"][0]
    logits_a, logits_b = np.asarray(forward(model, first)), np.asarray(forward(model, second))
    others = (seg == 1) | (seg == 3)
    np.testing.assert_allclose(logits_a[0, others], logits_b[0, others], rtol=0, atol=1e-6)
    assert np.abs(logits_a[0, seg == 2] - logits_b[0, seg == 2]).max() > 1e-3
    alone = build_rows(Documents.build(docs[2:]), [[0]], 128)  # the third document by itself
    np.testing.assert_allclose(np.asarray(forward(model, alone))[0, alone["segment_ids_bt"][0] > 0],
                               logits_a[0, seg == 3], atol=1e-5)


# --------------------------------------------------------------------------------- order


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_resume_from_state_gives_the_same_batches(traces_dir, tok):
    mixture = read_traces([traces_dir])
    data = TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=256, batch_size=6, seed=3))
    steps = data.steps_per_epoch(0)
    run = _take(data.batches(), steps + 3)  # crosses into epoch 1
    assert run[steps - 1][1] == DataState(0, steps, data.fingerprint)
    assert run[steps][1] == DataState(1, 1, data.fingerprint)
    saved = DataState.from_dict(run[steps - 2][1].to_dict())  # as read back from a checkpoint
    fresh = TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=256, batch_size=6, seed=3))
    resumed = _take(fresh.batches(saved), 4)
    for (want, want_state), (got, got_state) in zip(run[steps - 1:], resumed, strict=True):
        assert want_state == got_state
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # each epoch is shuffled on its own, and the seed matters
    assert data.epoch_rows(0) != data.epoch_rows(1)
    other = TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=256, batch_size=6, seed=4))
    assert other.epoch_rows(0) != fresh.epoch_rows(0)


def test_data_config_builds_the_same_stream(traces_dir, tok):
    cfg = DataConfig(traces=[str(traces_dir)], seq_len=256, batch_size=6, seed=3)
    direct = TrainData.from_mixture(read_traces([traces_dir]), tok,
                                    StreamConfig(seq_len=256, batch_size=6, seed=3))
    from_cfg = TrainData.from_config(cfg, tok)
    assert from_cfg.fingerprint == direct.fingerprint
    assert from_cfg.epoch_rows(0) == direct.epoch_rows(0)


def test_resume_with_other_data_settings_is_an_error(traces_dir, tok):
    mixture = read_traces([traces_dir])
    state = DataState(0, 2, TrainData.from_mixture(
        mixture, tok, StreamConfig(seq_len=256, batch_size=6)).fingerprint)
    moved = TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=256, batch_size=4))
    with pytest.raises(DistillError, match="changed since the checkpoint"):
        next(moved.batches(state))


def test_processes_share_each_global_batch(traces_dir, tok):
    mixture = read_traces([traces_dir])
    stream = StreamConfig(seq_len=256, batch_size=6, seed=1)
    whole = TrainData.from_mixture(mixture, tok, stream)
    shares = [TrainData.from_mixture(mixture, tok, stream, process_index=p, process_count=3)
              for p in range(3)]
    last = whole.steps_per_epoch(0) - 1  # the last batch is completed with empty rows
    for index in (0, last):
        want = whole.batch(0, index)
        parts = [s.batch(0, index) for s in shares]
        assert all(p["tokens_bt"].shape == (2, 256) for p in parts)
        for key in want:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
    empty = (last + 1) * 6 - len(whole.epoch_rows(0))
    assert empty > 0  # (the case exercises the completion)
    assert not whole.batch(0, last)["segment_ids_bt"][6 - empty:].any()


def test_mixture_weights_set_each_datasets_share(tmp_path, tok):
    a = write_traces(tmp_path / "a", [trace_row(i, 2) for i in range(40)], shards=1)
    b = write_traces(tmp_path / "b", [trace_row(100 + i, 2) for i in range(40)], shards=1)
    data = TrainData.from_mixture(read_traces([a, b], weights=[3, 1]), tok,
                                  StreamConfig(seq_len=512, batch_size=4))
    for epoch in (0, 1):
        docs = [d for r in data.epoch_rows(epoch) for d in r]
        from_a = sum(d < 40 for d in docs)
        assert (len(docs), from_a) == (80, 60)
        assert len(set(docs) - set(range(40))) == 20  # the down-sampled dataset repeats nothing
    assert {d for r in data.epoch_rows(0) for d in r} != {d for r in data.epoch_rows(1) for d in r}


# --------------------------------------------------------------------------------- teacher top-k


def test_teacher_topk_lines_up_with_the_targets(tmp_path, tok):
    rows = [with_teacher(tok, 0), with_teacher(tok, 1, drop_eos=True), trace_row(2, 3)]
    path = write_traces(tmp_path / "kd", rows, shards=1)
    data = TrainData.from_mixture(read_traces([path], with_teacher=True), tok,
                                  StreamConfig(seq_len=512, batch_size=3, top_k=4))
    assert (data.counts.documents, data.counts.with_teacher) == (3, 2)
    batch = data.batch(0, 0)
    has = np.isfinite(batch["top_logprobs_btk"][..., 0])
    mask = batch["loss_mask_bt"]
    assert not (has & ~mask).any()  # teacher entries sit on completion targets only
    np.testing.assert_array_equal(batch["top_ids_btk"][..., 0][has], batch["targets_bt"][has])
    assert np.all(np.isneginf(batch["top_logprobs_btk"][..., 3]))  # k = 3 stored, padded to 4
    [plain] = [d for d in range(3) if data.docs.teacher[d] is None]  # trace 2
    # completion targets with no teacher entry: the EOS of trace 1, and all of trace 2
    assert (mask & ~has).sum() == 1 + data.docs.doc(plain)[1].sum()


def test_teacher_topk_from_another_tokenizer_is_an_error(tmp_path, tok):
    path = write_traces(tmp_path / "kd", [with_teacher(tok, 0, extra=4)], shards=1)
    with pytest.raises(DistillError, match=r"trace p0#0: \d+ teacher top-k rows but the student "
                                           r"tokenizer gives \d+ completion tokens"):
        TrainData.from_mixture(read_traces([path], with_teacher=True), tok,
                               StreamConfig(seq_len=512, batch_size=1, top_k=2))


def test_a_rare_misaligned_top_k_trains_without_logit_targets(tmp_path, tok, capsys):
    # e.g. a completion whose stored reasoning lost text: 1 trace of 120, not another tokenizer
    rows = [with_teacher(tok, i) for i in range(119)] + [with_teacher(tok, 119, extra=4)]
    path = write_traces(tmp_path / "kd", rows, shards=2)
    data = TrainData.from_mixture(read_traces([path], with_teacher=True), tok,
                                  StreamConfig(seq_len=512, batch_size=4, top_k=2))
    assert (data.counts.documents, data.counts.with_teacher) == (120, 119)
    assert "warning: 1 of 120 traces with top-k train without logit targets" in (
        capsys.readouterr().out)


# --------------------------------------------------------------------------------- bad input


def test_empty_trace_dataset(tmp_path, tok):
    (tmp_path / "none").mkdir()
    with pytest.raises(DistillError, match=r"none: no \.parquet, \.jsonl or \.jsonl\.zst files, no manifest"):
        read_traces([tmp_path / "none"])
    empty = write_traces(tmp_path / "empty", [], shards=1)
    with pytest.raises(DistillError, match=r"empty: the dataset is empty \(0 rows\)$"):
        read_traces([empty])
    wrong = write_traces(tmp_path / "wrong", [trace_row(0, 2, correct=False)], shards=1)
    with pytest.raises(DistillError, match=r"wrong: no trace passes keep='correct' \(0 of 1 traces\)"):
        read_traces([wrong])


def test_traces_without_assistant_text(tmp_path, tok):
    rows = [trace_row(i, 2, reasoning="", answer=" ") for i in range(3)]
    path = write_traces(tmp_path / "blank", rows, shards=1)
    with pytest.raises(DistillError, match=r"blank: no trace has assistant text \(reasoning and "
                                           r"answer empty in all 3\)$"):
        TrainData.from_mixture(read_traces([path]), tok, StreamConfig(seq_len=256, batch_size=2))
    mixed = write_traces(tmp_path / "mixed", rows + [trace_row(9, 2)], shards=1)
    data = TrainData.from_mixture(read_traces([mixed]), tok, StreamConfig(seq_len=256, batch_size=2))
    assert (data.counts.documents, data.counts.no_assistant_text) == (1, 3)


def test_seq_len_shorter_than_the_prompt(traces_dir, tok):
    mixture = read_traces([traces_dir])
    with pytest.raises(DistillError, match=r"trace p\d+#0: the prompt is \d+ tokens, so seq_len 16 "
                                           r"leaves no completion token"):
        TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=16, batch_size=2, overlong="truncate"))
    with pytest.raises(DistillError, match=r"run: no trace fits in seq_len 16 \(270 of 270 too "
                                           r"long, 0 without assistant text\)"):
        TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=16, batch_size=2, overlong="drop"))


def test_bad_stream_settings(traces_dir, tok):
    mixture = read_traces([traces_dir])
    with pytest.raises(DistillError, match="batch_size 5 must be a positive multiple of the 2"):
        TrainData.from_mixture(mixture, tok, StreamConfig(seq_len=64, batch_size=5), process_count=2)
    with pytest.raises(DistillError, match=r"^data: overlong: .*'drop' or 'truncate' \(got 'cut'\)$"):
        # the stream's bounds are checked once, where its settings are validated (DataConfig's)
        validate(StreamConfig, {"seq_len": 64, "batch_size": 2, "overlong": "cut"}, "data")
    with pytest.raises(DistillError, match="2 mixture weights for 1 trace datasets"):
        read_traces([traces_dir], weights=[1, 2])
    with pytest.raises(DistillError, match="unknown keep filter 'good'"):
        read_traces([traces_dir], keep="good")
