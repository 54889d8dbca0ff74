"""The demo's tokenizer: a small SentencePiece BPE trained on the demo's own corpus, carrying the
DeepSeek-R1-Distill chat template and special tokens, shared by the teacher and every student (so
the teacher's top-k log-probabilities line up with the students' vocabulary for logit distillation).

The text is kept byte for byte: no Unicode normalisation, no dummy prefix, no collapsing of spaces,
and "\\n" is a piece of its own (SentencePiece would otherwise treat it as whitespace), so
`decode(encode(text)) == text` for every solution. Digits are never merged (`split_digits`), so
numbers are spelled digit by digit as in a character-level model, and "\\boxed{" is one piece.
Together these leave a solution (digits, "+-*=", newlines, the think tag, the boxed answer) a
single possible tokenization: the tokens a teacher samples are the tokens a student gets when it
re-tokenizes the text, which logit distillation on stored top-k rows relies on. (The merges the
BPE learns are in the questions: " +", " *", " -".)
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from distill.chat import R1_DISTILL_CHAT_TEMPLATE
from distill.errors import DistillError
from distill.tokenizer import Tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<pad>"
UNK = "<unk>"
# the template's markers, the newline and the answer's opening, each one piece (ids 4.. after
# unk, bos, eos, pad)
USER_DEFINED = ("\n", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "\\boxed{")
# `distill demo --student-tokenizer other`: the students' own vocabulary, from the same corpus with
# fewer merges and without the answer's opening as one piece (so "\\boxed{" is seven tokens there)
OTHER_PIECES, OTHER_VOCAB = USER_DEFINED[:-1], 36
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 64,
                    pieces: Sequence[str] = USER_DEFINED) -> Tokenizer:
    """Train the BPE model on `texts`, save it as a Hugging Face tokenizer directory in `out_dir`
    (tokenizer.json, tokenizer.model, chat template) and return it as loaded from there.

    `vocab_size` is an upper bound: a corpus with fewer distinct merges gives a smaller vocabulary.
    `pieces`: the user-defined pieces (the template's markers must stay among them).
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, hard_vocab_limit=False, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, character_coverage=1.0, user_defined_symbols=list(pieces),
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, unk_piece=UNK,
            bos_piece=BOS, eos_piece=EOS, pad_piece=PAD, minloglevel=2)
    except RuntimeError as e:  # e.g. an empty corpus
        raise DistillError(f"training the demo tokenizer failed: {e}") from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = Tokenizer.from_sentencepiece(out / "tokenizer.model")
    tok.chat_template = R1_DISTILL_CHAT_TEMPLATE
    tok.add_bos_token = False  # the template writes BOS itself
    tok.save_pretrained(out)
    return Tokenizer.from_pretrained(out)
