"""The progress bar of a tokenized-cache build: traces read (of the datasets' rows, where known),
tokens written per second by this process, ETA."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class BuildProgress:
    def __init__(self, total: int | None, enabled: bool = True):
        self.bar = Progress(
            TextColumn("[bold]tokenize"), BarColumn(), MofNCompleteColumn(),
            TextColumn("traces · {task.fields[tps]} tok/s {task.fields[note]}"),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)
        self.task = self.bar.add_task("tokenize", total=total, tps="-", note="")
        self.t0 = time.perf_counter()

    def __enter__(self) -> BuildProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, traces: int, tokens: int) -> None:
        """`traces` more read; `tokens` written by this process so far."""
        tps = tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=traces, tps=f"{tps:,.0f}", note="")

    def waiting(self, blocks: int) -> None:
        self.bar.update(self.task, note=f"· waiting for other processes ({blocks} blocks)")
