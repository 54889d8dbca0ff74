"""A SentencePiece `.model` -> a `tokenizers.Tokenizer` that encodes like
`sentencepiece.SentencePieceProcessor.encode` (BPE or unigram).
"""

from __future__ import annotations

import re

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE, Unigram

from distill.errors import DistillError
from distill.tokenizer.hf_dir import SPECIAL_NAMES

_SP_NORMAL, _SP_CONTROL, _SP_USER_DEFINED = 1, 3, 4  # sentencepiece piece types



def sentencepiece_backend(model: bytes) -> tuple[_Backend, dict[str, str | None]]:
    """Convert a SentencePiece model into a `tokenizers.Tokenizer` that encodes like it does.

    Follows the model's normalizer spec, ranks BPE merges by piece score, keeps user-defined pieces
    whole, and makes control pieces special tokens (text between them is encoded chunk by chunk,
    each chunk with its own dummy prefix, as SentencePiece would encode each chunk alone).
    """
    sentencepiece.SentencePieceProcessor(model_proto=model)  # validates the file
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    trainer, norm, pieces = proto.trainer_spec, proto.normalizer_spec, proto.pieces
    user_defined = [p.piece for p in pieces if p.type == _SP_USER_DEFINED]
    if trainer.model_type == 1:  # unigram
        backend = _Backend(Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                                   byte_fallback=trainer.byte_fallback))
    elif trainer.model_type == 2:  # BPE
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
        ranked = sorted((-score, i, tok[:k], tok[k:]) for tok, (score, i) in normal.items()
                        for k in range(1, len(tok)) if tok[:k] in normal and tok[k:] in normal)
        backend = _Backend(BPE(vocab={p.piece: i for i, p in enumerate(pieces)},
                               merges=[(left, right) for _, _, left, right in ranked],
                               unk_token=trainer.unk_piece, fuse_unk=True, dropout=None,
                               byte_fallback=trainer.byte_fallback, ignore_merges=bool(user_defined)))
    else:
        raise DistillError(f"unsupported SentencePiece model type {trainer.model_type} (want BPE or unigram)")
    backend.normalizer = _sentencepiece_normalizer(norm)
    pre = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)] * bool(
        norm.add_dummy_prefix)
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        backend.pre_tokenizer = pre_tokenizers.Sequence(pre)
    steps = [decoders.Replace("▁", " ")] + [decoders.ByteFallback()] * trainer.byte_fallback
    if norm.add_dummy_prefix:  # fuse first: Strip acts on each token
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                                for p in pieces if p.type == _SP_CONTROL])
    ids = (trainer.bos_id, trainer.eos_id, trainer.unk_id, trainer.pad_id)
    special = {name: (pieces[i].piece if 0 <= i < len(pieces) else None)
               for name, i in zip(SPECIAL_NAMES, ids, strict=True)}
    return backend, special


def _sentencepiece_normalizer(norm) -> normalizers.Normalizer:
    """SentencePiece's normalizer steps, in its order."""
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # only spaces: newlines and tabs stay
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if norm.add_dummy_prefix:  # Metaspace skips the prefix when text starts with "▁"; SentencePiece doesn't
        steps.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    return normalizers.Sequence(steps)
