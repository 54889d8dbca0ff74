"""Input prefetch: the next batches are built and sent to the devices on a background thread while
the current step runs, so the step does not wait for host-side packing or the host-to-device copy.

The order is the data stream's own (`TrainData.batches`): prefetching only runs ahead of it by
`depth` batches, so every batch is consumed with the `DataState` that follows it and a checkpoint
taken after a step resumes exactly as without prefetch. An exception on the thread (bad data) is
raised in the consumer at the batch where it happened; `close()` (or leaving the `with` block) stops
the thread without waiting for the stream to end.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_END = object()


class Prefetch:
    """Iterate `items` `depth` ahead on a daemon thread, each item passed through `prepare` there
    (e.g. building device arrays). Use as a context manager or call `close()`."""

    def __init__(self, items: Iterator, prepare: Callable[[Any], Any] = lambda x: x,
                 depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1 (got {depth})")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, prepare), daemon=True,
                                        name="distill-prefetch")
        self._thread.start()

    def _run(self, items: Iterator, prepare) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._put((True, prepare(item)))
            self._put((True, _END))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))

    def _put(self, entry) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        ok, value = self._queue.get()
        if not ok:
            self.close()
            raise value
        if value is _END:
            self.close()
            raise StopIteration
        return value

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue: that is released)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
