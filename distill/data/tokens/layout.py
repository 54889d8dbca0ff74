"""The on-disk layout of a tokenized cache, `<root>/<key>/` (key: a hash of `inputs.json`):

    inputs.json                 what the cache depends on: each dataset's settings, keep filter and
                                input files (size, modification time, a run's shard checksums),
                                the student tokenizer's fingerprint, the render settings and top-k
    parts/d{D:03}-b{B:06}/      block B of dataset D: BLOCK_TRACES kept traces, in source order
        tokens.bin              token ids of the documents, end to end (uint8/16/32: the vocab's)
        loss.bin                loss mask, one byte a token
        top_ids.bin, top_logprobs.bin   with top-k: [rows, K] teacher entries (ids in the vocab's
                                type, log-probabilities float16), the completion tokens' rows
        index.npz               per document: lengths, first (first loss target), prompt (its
                                length), rank (held-out hash), teacher_rows (-1: none);
                                no_text_rank: the ranks of traces without assistant text
        ids.txt                 the documents' trace ids (for messages)
        meta.json               counts, the block's share of the content digest, who built it
    walks/d{D:03}.json          dataset D's length in blocks, once a builder has read it through
    claims/                     which process builds which block (while building)
    complete.json               written last: the blocks of each dataset and their counts
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distill.errors import DistillError

FORMAT = "distill-tokens/1"
RENDER_VERSION = 2  # bump when rendering changes the ids a trace gets (2: top-k aligned by bytes)
BLOCK_TRACES = 1024  # traces per part: the unit of work builders share
BATCH_TRACES = 64  # traces rendered and tokenised together
INPUTS, COMPLETE, PARTS, CLAIMS, WALKS = "inputs.json", "complete.json", "parts", "claims", "walks"
_DIGEST_MOD = 1 << 128


def part_name(dataset: int, block: int) -> str:
    return f"d{dataset:03d}-b{block:06d}"


def trace_digest(dataset: int, position: int, trace_id: str) -> int:
    """Trace `position` of dataset `dataset` (counting kept traces) as a 128-bit number; the
    content digest of a mixture is their sum, so blocks built anywhere add up to the same digest
    as one pass over the traces (`content_digest`)."""
    h = hashlib.blake2b(f"{dataset}\0{position}\0{trace_id}".encode(), digest_size=16)
    return int.from_bytes(h.digest(), "big")


def digest_hex(total: int) -> str:
    return f"{total % _DIGEST_MOD:032x}"


def content_digest(total: int) -> str:
    """The short digest of a mixture's traces (the sum of their `trace_digest`s)."""
    return digest_hex(total)[:16]


def damaged(cache: Path, why: str) -> DistillError:
    return DistillError(f"{cache}: the tokenized cache is damaged ({why}); delete it to rebuild")


def read_json(path: Path, cache: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise damaged(cache, f"{path.relative_to(cache)} unreadable: {e}") from None
