"""A GGUF file's tokenizer metadata -> a `tokenizers.Tokenizer`, rebuilt the way transformers
rebuilds it (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`): byte-level BPE (gpt2)
or sentencepiece-style BPE (llama).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from distill.tokenizer.splits import GGUF_SPLITS
from distill.tokenizer.token_bytes import bytes_to_unicode

_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_token(meta: dict, tokens: list[str], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def gguf_backend(meta: dict) -> _Backend:
    """transformers' GGUF tokenizer: byte-level BPE (gpt2) or sentencepiece-style BPE (llama)."""
    tokens = meta["tokenizer.ggml.tokens"]
    typed = list(zip(tokens, meta.get("tokenizer.ggml.token_type") or [], strict=False))
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    if byte_level:
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
                 for i, t in enumerate(tokens)}
        backend = _Backend(BPE(vocab=vocab, merges=_gguf_merges(meta, vocab), dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = _Backend(BPE(vocab=vocab, merges=_gguf_merges(meta, vocab), fuse_unk=True,
                               byte_fallback=True, dropout=None))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(content=" ", left=1)])
    # Control tokens are special; in a byte-level vocabulary one spelled outside the byte alphabet
    # is a llama.cpp mislabel and is skipped. User-defined tokens (like <think>) stay whole.
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=True) for t, kind in typed
        if kind == _GGUF_CONTROL and (not byte_level or set(t) <= alphabet)])
    known = backend.get_vocab(with_added_tokens=True)
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in typed if kind == _GGUF_USER_DEFINED and t in known])
    split = GGUF_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return backend


def _gguf_merges(meta: dict, vocab: dict[str, int]) -> list[tuple[str, ...]]:
    """The file's merges, or (old sentencepiece files) merges implied by the token scores."""
    if "tokenizer.ggml.merges" in meta:
        return [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], strict=False))
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
