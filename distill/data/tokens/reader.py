"""Reading a complete tokenized cache (layout: `distill.data.tokens.layout`): per-document
arrays in memory, tokens, loss masks and teacher entries memory-mapped from the parts' files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from distill.data.tokens.layout import COMPLETE, FORMAT, PARTS, damaged, part_name, read_json


@dataclasses.dataclass
class _Part:
    """One block's files, memory-mapped."""

    tokens: np.ndarray
    loss: np.ndarray
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    directory: Path


class TokenCache:
    """A complete cache, memory-mapped: the documents of every dataset (traces with assistant
    text, all splits) with per-document arrays in memory (`lengths`, `first`, `rank`, `dataset`,
    `has_teacher`) and tokens, loss masks and teacher entries read from disk on demand. The
    interface of `distill.data.packing.Documents`. `traces`: kept traces read per dataset;
    `no_text_rank`: per dataset, the held-out ranks of its traces without assistant text."""

    def __init__(self, directory: Path, complete: dict, parts: list[_Part],
                 columns: dict[str, np.ndarray], no_text_rank: list[np.ndarray]):
        """`columns`: the parts' index columns end to end, plus `dataset` and `part` (which
        dataset and part each document is in)."""
        self.directory = directory
        self.names = tuple(d["source"] for d in complete["datasets"])
        self.traces = [d["traces"] for d in complete["datasets"]]  # kept traces read
        self.digest, self.top_k = complete["digest"], complete["top_k"]
        self.no_text_rank = no_text_rank
        self.lengths = columns["lengths"].astype(np.int64)
        self.first = columns["first"].astype(np.int64)
        self.rank = columns["rank"].astype(np.float64)
        self.dataset = columns["dataset"].astype(np.int32)
        self.has_teacher = columns["teacher_rows"] >= 0
        self.teacher_bad = columns["teacher_rows"] == -2  # top-k that did not align
        self._parts = parts
        self._part_of = columns["part"].astype(np.int64)
        self._prompt = columns["prompt"].astype(np.int64)  # where the teacher's rows start
        self._teacher_rows = np.maximum(columns["teacher_rows"], 0).astype(np.int64)
        # where each document starts in its part's token and teacher-row files
        self._start = _starts(self.lengths, self._part_of)
        self._teacher_start = _starts(self._teacher_rows, self._part_of)

    @classmethod
    def open(cls, directory: Path) -> TokenCache:
        complete = read_json(directory / COMPLETE, directory)
        if complete.get("format") != FORMAT:
            raise damaged(directory, f"not of format {FORMAT}")
        names = ("lengths", "first", "prompt", "rank", "teacher_rows", "dataset", "part")
        parts, cols, no_text = [], {k: [] for k in names}, []
        for i, d in enumerate(complete["datasets"]):
            no_text.append([])
            for b in range(d["blocks"]):
                part, index = _open_part(directory / PARTS / part_name(i, b), complete)
                n = len(index["lengths"])
                index.update(dataset=np.full(n, i), part=np.full(n, len(parts)))
                for k in names:
                    cols[k].append(index[k])
                no_text[-1].append(index["no_text_rank"])
                parts.append(part)
        columns = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        return cls(directory, complete, parts, columns, [np.concatenate(r) for r in no_text])

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        part, s = self._parts[self._part_of[d]], self._start[d]
        return part.tokens[s:s + self.lengths[d]], part.loss[s:s + self.lengths[d]]

    def teacher_of(self, d: int):
        """None, or (first completion token, top-k ids [c, K], log-probs [c, K])."""
        if not self.has_teacher[d]:
            return None
        part, s, n = self._parts[self._part_of[d]], self._teacher_start[d], self._teacher_rows[d]
        # the teacher's rows start at the first completion token (the prompt's length)
        return int(self._prompt[d]), part.top_ids[s:s + n], part.top_logprobs[s:s + n]

    def _local(self, d: int) -> tuple[_Part, int]:
        """Document d's part and its index there."""
        return (self._parts[self._part_of[d]],
                d - int(np.searchsorted(self._part_of, self._part_of[d])))

    def trace_id(self, d: int) -> str:
        """The trace id of document d (read from its part, for messages)."""
        part, i = self._local(d)
        return (part.directory / "ids.txt").read_text().split("\n")[i]

    def teacher_error(self, d: int) -> str | None:
        """Why document d's teacher top-k did not align with its tokens (None: it did)."""
        if not self.teacher_bad[d]:
            return None
        part, i = self._local(d)
        meta = read_json(part.directory / "meta.json", self.directory)
        return meta["teacher_errors"][str(i)]

    def nbytes(self) -> int:
        """Bytes on disk of the memory-mapped files."""
        return sum(f.stat().st_size for p in self._parts for f in p.directory.glob("*.bin"))


def _starts(sizes: np.ndarray, part_of: np.ndarray) -> np.ndarray:
    """Each item's offset within its part, for items of `sizes` laid end to end per part."""
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if len(part_of):
        first = np.flatnonzero(np.r_[True, part_of[1:] != part_of[:-1]])
        base = np.repeat(starts[first], np.diff(np.r_[first, len(part_of)]))
        starts = starts - base
    return starts.astype(np.int64)


def _open_part(part_dir: Path, complete: dict) -> tuple[_Part, dict]:
    cache = part_dir.parent.parent
    meta = read_json(part_dir / "meta.json", cache)
    try:
        with np.load(part_dir / "index.npz") as z:
            index = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise damaged(cache, f"{part_dir.name}/index.npz unreadable ({e})") from None
    tok = np.dtype(complete["token_dtype"])
    k = complete["top_k"]
    rows = int(meta["teacher_rows"])
    part = _Part(_map(part_dir / "tokens.bin", tok, (meta["tokens"],)),
                 _map(part_dir / "loss.bin", np.bool_, (meta["tokens"],)),
                 _map(part_dir / "top_ids.bin", tok, (rows, k)) if k else None,
                 _map(part_dir / "top_logprobs.bin", np.float16, (rows, k)) if k else None,
                 part_dir)
    if int(index["lengths"].sum()) != meta["tokens"] or len(index["lengths"]) != meta["documents"]:
        raise damaged(cache, f"{part_dir.name}: index and files disagree")
    return part, index


def _map(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        size = path.stat().st_size
    except OSError:
        raise damaged(path.parents[2], f"{path.parent.name}/{path.name} is missing") from None
    if size != expected:
        raise damaged(path.parents[2], f"{path.parent.name}/{path.name} holds {size} bytes, "
                                       f"{expected} expected")
    if expected == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)
