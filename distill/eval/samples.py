"""The work folder of a resumable `distill eval`: `<output>.partial/` beside the report directory,
holding `samples.jsonl` and `fingerprint.json` until the report is in place.

Each completion is appended to samples.jsonl as one JSON line the moment it is made, keyed by
(model, prompt id, sample index, greedy), and written whole with one `write` and an fsync: a
`kill -9` leaves at most a torn last line, which the next run cuts off and samples again. A rerun
of the same command reads what is there, samples only the rest, and computes the report from
the stored samples. `fingerprint.json` records what decides the samples (the protocol, the
prompts, the models); a rerun whose config differs there is refused in one line rather than
mixing samples of two configurations. A full disk while appending is one line that says the
samples so far are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from distill.data.records import PromptRecord, Sample
from distill.errors import DistillError
from distill.fsutil import FREE, fsync_dir, write_atomic, writing

SAMPLES, FINGERPRINT = "samples.jsonl", "fingerprint.json"
# fields of a model entry that change how it runs, not what it samples (a restarted server may
# listen at another address; the slot count does not change a sample: distill.backends.jax)
_OPERATIONAL = frozenset({"role", "metrics", "engine", "base_url", "api_key_env", "concurrency",
                          "timeout_s", "max_retries", "backoff_initial_s", "backoff_max_s"})


def work_dir(out_dir: Path) -> Path:
    """Where the samples of the report `out_dir` are kept until it is written."""
    return out_dir.with_name(f"{out_dir.name}.partial")


def fingerprint(protocol: dict, prompts: list[PromptRecord], models: dict[str, dict]) -> dict:
    """What decides the samples, by section (protocol, prompts, each model): a section's value,
    or a digest where it is long (the prompts)."""
    asked = json.dumps([[p.id, p.messages()] for p in prompts], ensure_ascii=False)
    print_ = {"protocol": protocol,
              "prompts": {"count": len(prompts),
                          "sha256": hashlib.sha256(asked.encode()).hexdigest()},
              "models": {name: {k: v for k, v in entry.items() if k not in _OPERATIONAL}
                         for name, entry in models.items()}}
    return json.loads(json.dumps(print_))  # as it reads back from the file (tuples as lists)


def _differences(old: dict, new: dict) -> list[str]:
    keys = []
    for section in ("protocol", "prompts", "models"):
        a, b = old.get(section), new.get(section)
        if section == "prompts" or not (isinstance(a, dict) and isinstance(b, dict)):
            keys += [section] if a != b else []
            continue
        keys += [f"{section}.{k}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
    return keys


def key(row: dict) -> tuple:
    """A stored sample's key: (model, prompt id, sample index, greedy)."""
    return row["model"], row["prompt_id"], row["sample_index"], row["greedy"]


class SampleStore:
    """The samples of one eval so far (`rows`: key -> row) and the file they stream to.

    `open` reads what a previous run left (cutting off a torn last line), refusing samples of
    another configuration; `add` appends one; `remove` deletes the folder once the report is in
    place. The folder and its fingerprint are written with the first sample, so a run that fails
    before sampling leaves nothing behind."""

    def __init__(self, folder: Path, print_: dict):
        self.folder, self.print_ = folder, print_
        self.path = folder / SAMPLES
        self.rows: dict[tuple, dict] = {}
        self.added = 0  # samples appended by this run
        self._fd: int | None = None
        self._lock = threading.Lock()  # HTTP samples arrive on worker threads

    @classmethod
    def open(cls, folder: Path, print_: dict) -> SampleStore:
        """The store in `folder`, with the samples a previous run of the same config left."""
        store = cls(folder, print_)
        fp = folder / FINGERPRINT
        if fp.is_file():
            try:
                old = json.loads(fp.read_text(encoding="utf-8"))
            except ValueError:
                raise DistillError(f"{fp}: not a fingerprint distill wrote; remove {folder} to "
                                   "start afresh") from None
            if old != print_:
                raise DistillError(
                    f"{folder}: holds samples of another configuration (it differs in "
                    f"{', '.join(_differences(old, print_)) or 'its fingerprint'}); rerun with the "
                    f"config that made them, or remove {folder} to start afresh")
            store._read()
        return store

    def _read(self) -> None:
        """Load the whole lines; cut the file after the last one (a torn line is sampled again)."""
        if not self.path.is_file():
            return
        data, good = self.path.read_bytes(), 0
        for line in data.splitlines(keepends=True):
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
                self.rows[key(row)] = row
            except (ValueError, TypeError, KeyError):
                break
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, k: tuple) -> bool:
        return k in self.rows

    def add(self, model: str, prompt_id: str, sample: Sample, greedy: bool) -> None:
        """Append one sample, whole, and flush it to disk. A failed write (a full disk) is a
        WriteFailed that says the samples before it are kept."""
        row = {"model": model, "prompt_id": prompt_id, "sample_index": sample.sample_index,
               "greedy": greedy, "completion": sample.completion,
               "finish_reason": sample.finish_reason, "prompt_tokens": sample.prompt_tokens,
               "completion_tokens": sample.completion_tokens}
        if sample.thinking is not None:  # budget forcing
            row |= {"thinking_tokens": sample.thinking.tokens, "forced": sample.thinking.forced,
                    "waits": sample.thinking.waits}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        with self._lock:
            with writing(self.path, self.safe):
                self._append(line)
            self.rows[key(row)] = row
            self.added += 1

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / FINGERPRINT).is_file():
                write_atomic(self.folder / FINGERPRINT,
                             (json.dumps(self.print_, indent=1) + "\n").encode())
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fsync_dir(self.folder)
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def safe(self) -> str:
        """What a failed write leaves safe, in a WriteFailed's words."""
        return (f"the {len(self.rows)} samples made before are kept in {self.path}; {FREE} "
                "and rerun the same command: it samples only the rest")

    def close(self) -> None:
        """Close the file (the samples stay)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        """Delete the folder (the report holds the samples now)."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
