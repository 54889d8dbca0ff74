"""What each token id spells in bytes (`Tokenizer.token_bytes`): byte-level pieces mapped back
through GPT-2's byte table, SentencePiece pieces with their spaces and byte fallbacks.
"""

from __future__ import annotations

import functools
import json
import re

from tokenizers import Tokenizer as _Backend

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_kinds(decoder: dict | None) -> set[str]:
    """The types of a tokenizer.json decoder, a Sequence's members included."""
    if not decoder:
        return set()
    return {decoder["type"]}.union(*(_decoder_kinds(d) for d in decoder.get("decoders", [])))


def token_bytes_table(backend: _Backend) -> list[bytes]:
    """`Tokenizer.token_bytes` of a backend (see there)."""
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
    table = [b""] * backend.get_vocab_size(with_added_tokens=True)
    if "ByteLevel" in kinds:
        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def piece_bytes(piece: str) -> bytes:
            return bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) \
                else piece.encode()
    else:
        fallback = "ByteFallback" in kinds

        def piece_bytes(piece: str) -> bytes:
            m = _BYTE_FALLBACK.fullmatch(piece) if fallback else None
            return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
    for piece, i in backend.get_vocab(with_added_tokens=False).items():
        table[i] = piece_bytes(piece)
    for i, added in backend.get_added_tokens_decoder().items():
        table[i] = added.content.encode()
    return table


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
