"""Cross-tokenizer alignment on real vocabularies: DeepSeek-V3/R1's, Qwen2.5's and SmolLM2's
byte-level BPE and a SentencePiece vocabulary with byte fallback. Every token's bytes, joined,
are the text; every aligned span spells the same bytes (and, where they are whole characters,
decodes to the same text) on both sides."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest

from distill.data.align import UNMATCHED, align, map_entries
from distill.errors import DistillError
from distill.tokenizer import Tokenizer
from tests import vocabularies

TEXTS = {
    "latex": r"Let $f(x) = \frac{x^2 + 3x}{\sqrt{2\pi}}$; then $\int_0^1 f(x)\,dx = \boxed{\tfrac{11}{6}}$.",
    "code": "def gcd(a, b):\n\twhile b:\n\t\ta, b = b, a % b  # Euclid\n    return a\n\n\nprint(gcd(12, 18))",
    "cjk": "设 x 为实数，求方程 x² − 5x + 6 = 0 的解。日本語のテキストも。한국어 문장.",
    "emoji": "Done ✅🎉 👩‍👩‍👧‍👦 🇫🇷 — naïve café, Straße, ﬁne.",
    "digits": "123456789 + 9876543210 = 9999999999; 3.14159265358979, 1e-10, 007, 2024-12-01",
    "whitespace": "a  b   c\t\td \n\n\n   e      \r\n f\u00a0g \u3000h   ",
    "think": "<think>\nFirst, 2 + 2 = 4.\nSo the answer is 4.\n</think>\n\nThe answer is $\\boxed{4}$.",
}


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer, tmp_path_factory):
    return {"deepseek-r1": vocabularies.deepseek_r1(), "qwen2.5": vocabularies.qwen25(),
            "smollm2": smollm2_tokenizer,
            "sentencepiece": _byte_fallback_sentencepiece(tmp_path_factory.mktemp("sp"))}


def _byte_fallback_sentencepiece(directory) -> Tokenizer:
    """A BPE SentencePiece model trained here on English only, so CJK and emoji fall back to
    bytes (<0xE8> ...); think tags are user-defined pieces."""
    import sentencepiece as spm

    corpus = ["The answer is 4. First, 2 + 2 = 4; so x = 3 and y = 12.",
              "def f(a, b): return a + b  # add", "Let the sum of the digits be 45."] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model,
                                   model_type="bpe", vocab_size=400, byte_fallback=True, minloglevel=2,
                                   user_defined_symbols=["<think>", "</think>"],
                                   hard_vocab_limit=False, add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")
    path = directory / "sp.model"
    path.write_bytes(model.getvalue())
    return Tokenizer.from_sentencepiece(path)


def _pieces(tok: Tokenizer, text: str) -> tuple[list[int], list[bytes]]:
    ids = tok.encode(text)
    table = tok.token_bytes()
    return ids, [table[i] for i in ids]


def test_the_qwen_vocabulary_is_qwens():
    """Our tokenizer.json-style rebuild gives tiktoken's ids on the same ranks."""
    tok = vocabularies.qwen25()
    assert len(tok) == 151_643 + 7 and tok.token_to_id("</think>") == 151649
    for text in TEXTS.values():
        text = text.replace("<think>", "").replace("</think>", "")
        assert tok.encode(text) == vocabularies.qwen25_reference_ids(text)


def test_the_deepseek_vocabulary_is_r1s(tokenizers):
    tok = tokenizers["deepseek-r1"]
    assert tok.backend.get_vocab_size(with_added_tokens=False) == 128_000
    assert len(tok.backend.get_added_tokens_decoder()) == 818 and len(tok) == 128_815  # ids < 128,815
    assert tok.token_to_id("<think>") == 128798 and tok.token_to_id("</think>") == 128799


@pytest.mark.parametrize("name", ["deepseek-r1", "qwen2.5", "smollm2", "sentencepiece"])
def test_token_bytes_spell_the_text(tokenizers, name):
    tok = tokenizers[name]
    for what, text in TEXTS.items():
        ids, pieces = _pieces(tok, text)
        assert b"".join(pieces) == text.encode(), (name, what)
        assert tok.decode(ids) == text, (name, what)
    if name == "sentencepiece":  # CJK and emoji went through the byte-fallback pieces
        assert any(tok.id_to_token(i).startswith("<0x") for i in tok.encode(TEXTS["cjk"]))


PAIRS = [p for p in itertools.permutations(["deepseek-r1", "qwen2.5", "smollm2", "sentencepiece"], 2)
         if "deepseek-r1" in p or p == ("qwen2.5", "smollm2")]


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_every_span_spells_the_same_text_on_both_sides(tokenizers, teacher, student):
    t_tok, s_tok = tokenizers[teacher], tokenizers[student]
    multi = 0
    for what, text in TEXTS.items():
        (t_ids, t_pieces), (s_ids, s_pieces) = _pieces(t_tok, text), _pieces(s_tok, text)
        spans = align(t_pieces, s_pieces)
        # contiguous, covering both sides, no empty span
        assert spans.teacher_start[0] == spans.student_start[0] == 0
        assert spans.teacher_stop[-1] == len(t_ids) and spans.student_stop[-1] == len(s_ids)
        assert (spans.teacher_start[1:] == spans.teacher_stop[:-1]).all()
        assert (spans.student_start[1:] == spans.student_stop[:-1]).all()
        assert (spans.teacher_stop > spans.teacher_start).all()
        assert (spans.student_stop > spans.student_start).all()
        for g in range(len(spans)):
            t_span = slice(spans.teacher_start[g], spans.teacher_stop[g])
            s_span = slice(spans.student_start[g], spans.student_stop[g])
            t_bytes, s_bytes = b"".join(t_pieces[t_span]), b"".join(s_pieces[s_span])
            assert t_bytes == s_bytes, (what, g)
            if _whole_characters(t_bytes):
                assert t_tok.decode(t_ids[t_span]) == s_tok.decode(s_ids[s_span]), (what, g)
            # a span is minimal: no shorter prefix of it closes on both sides
            t_ends = set(np.cumsum([len(p) for p in t_pieces[t_span]])[:-1].tolist())
            s_ends = set(np.cumsum([len(p) for p in s_pieces[s_span]])[:-1].tolist())
            assert not t_ends & s_ends
        multi += int(((spans.teacher_stop - spans.teacher_start) > 1).sum()
                     + ((spans.student_stop - spans.student_start) > 1).sum())
    assert multi > 0  # the vocabularies really differ: some spans merge several tokens


def _whole_characters(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("name", ["deepseek-r1", "smollm2"])
def test_one_tokenizer_aligns_token_for_token_and_maps_ids_to_themselves(tokenizers, name):
    tok = tokenizers[name]
    ids_of = tok.ids_by_bytes()
    for text in TEXTS.values():
        ids, pieces = _pieces(tok, text)
        spans = align(pieces, pieces)
        assert len(spans) == len(ids)
        np.testing.assert_array_equal(spans.teacher_start, np.arange(len(ids)))
        np.testing.assert_array_equal(map_entries([[p] for p in pieces], ids_of)[:, 0], ids)


def test_entries_map_to_student_ids_by_their_bytes(tokenizers):
    ds, qw = tokenizers["deepseek-r1"], tokenizers["qwen2.5"]
    ds_bytes, ids_of = ds.token_bytes(), qw.ids_by_bytes()
    probe = [ds.token_to_id(t) for t in ("<think>", "</think>")] + ds.encode(" the answer 4")
    mapped = map_entries([[ds_bytes[i] for i in probe]], ids_of)[0]
    assert mapped[0] == 151648 and mapped[1] == 151649
    for i, j in zip(probe, mapped, strict=True):
        assert j == UNMATCHED or qw.token_bytes()[j] == ds_bytes[i]
    assert (mapped[2:] != UNMATCHED).all()
    # a DeepSeek entry no Qwen token spells (a CJK word of several characters, one DeepSeek token)
    long_cjk = next(b for b in ds_bytes if len(b) >= 9 and _whole_characters(b)
                    and all("\u4e00" <= c <= "\u9fa5" for c in b.decode()) and b not in ids_of)
    assert map_entries([[long_cjk]], ids_of)[0, 0] == UNMATCHED


def test_a_sentencepiece_dummy_prefix_is_not_a_difference():
    spans = align([b" Hello", b" world"], [b"Hel", b"lo", b" wor", b"ld"])
    np.testing.assert_array_equal(spans.student_stop, [2, 4])


def test_different_texts_are_one_clear_error():
    with pytest.raises(DistillError, match="different texts.*byte 2"):
        align([b"abc", b"d"], [b"abx", b"d"])


def test_loose_alignment_skips_whitespace_the_rendering_changed():
    from distill.data.align import align_loose

    # sampled: "=\n\n</think>"; rendered (reasoning stripped, <think> added): "=\n</think>"
    teacher = [b"2", b"*", b"2", b"=", b"6", b"\n", b"6", b"+", b"6", b"=", b"\n", b"\n",
               b"</think>", b"\n\n", b"\\boxed{", b"6", b"}"]
    student = [b"<think>", b"\n", b"2", b"*", b"2", b"=", b"6", b"\n", b"6", b"+", b"6", b"=",
               b"\n", b"</think>", b"\n\n", b"\\boxed{", b"6", b"}"]
    spans = align_loose(teacher, student)
    pairs = [(b"".join(teacher[a:b]), b"".join(student[c:d])) for a, b, c, d in zip(
        spans.teacher_start, spans.teacher_stop, spans.student_start, spans.student_stop,
        strict=True)]
    assert all(t == s for t, s in pairs)  # every span spells the same bytes on both sides
    covered = [s for _, s in pairs]
    assert b"</think>" in covered and b"\\boxed{" in covered and b"+" in covered
    assert b"<think>" not in covered  # the student's own prefix has no teacher
    assert list(spans.student_start) == sorted(spans.student_start)
    with pytest.raises(DistillError, match="spell different texts"):
        align_loose(teacher[:-2] + [b"7", b"}"], student)
