"""The live progress bar of `distill generate` and its closing summary table."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class GenerateProgress:
    """Prompts done (of all), kept and rejected samples, generated tokens/s, ETA."""

    def __init__(self, prompts: int, n: int, done: dict, enabled: bool = True):
        self.n = n
        self.kept = done["records"]
        self.rejected = sum(done["rejected"].values())
        self.tokens = 0
        self.samples = 0
        self.t0 = time.perf_counter()
        self.bar = Progress(
            TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
            TextColumn("prompts · kept {task.fields[kept]} · rejected {task.fields[rejected]} · "
                       "{task.fields[tps]:.1f} tok/s"),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
            transient=False)
        self.task = self.bar.add_task("generate", total=prompts, completed=done["prompts"],
                                      kept=self.kept, rejected=self.rejected, tps=0.0)

    def __enter__(self) -> GenerateProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def _tps(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def on_sample(self, _prompt: int, sample) -> None:
        """A sample came back (not yet judged): count its tokens; a prompt is done every n."""
        self.tokens += sample.completion_tokens
        self.samples += 1
        self.bar.update(self.task, tps=self._tps(),
                        advance=1 if self.samples % self.n == 0 else 0)

    def on_shard(self, stats: dict, kept: int) -> None:
        """A shard was judged and stored."""
        self.kept += kept
        self.rejected += sum(stats["rejected"].values())
        self.bar.update(self.task, kept=self.kept, rejected=self.rejected, tps=self._tps())


def summary_table(summary) -> Table:
    """The table `distill generate` prints at the end."""
    t = Table(title=f"traces: {summary.run_dir}", show_header=False)
    samples = max(summary.samples, 1)
    t.add_row("prompts", str(summary.prompts))
    t.add_row("samples", str(summary.samples))
    t.add_row("kept", f"{summary.records} ({100 * summary.records / samples:.1f}%)")
    for reason, count in summary.rejected.items():
        t.add_row(f"rejected: {reason}", str(count))
    t.add_row("completion tokens", str(summary.completion_tokens))
    rate = summary.completion_tokens / summary.seconds if summary.seconds > 0 else 0.0
    t.add_row("this session", f"{summary.seconds:.1f} s, {rate:.1f} tok/s"
              + (f", resumed after {summary.resumed_shards} stored shards"
                 if summary.resumed_shards else ""))
    return t


def import_table(summary) -> Table:
    """What `distill traces import` did: rows, traces, kept, each rejection reason, speed."""
    table = Table(title=f"import: {summary.run_dir}", show_header=False)
    table.add_row("source rows", f"{summary.rows:,}")
    table.add_row("traces judged", f"{summary.traces:,}")
    table.add_row("kept", f"{summary.records:,}")
    for reason, n in sorted(summary.rejected.items(), key=lambda kv: -kv[1]):
        table.add_row(f"rejected: {reason}", f"{n:,}")
    table.add_row("rows/s", f"{summary.rows_per_s:,.0f} ({summary.seconds:.1f} s)")
    if summary.resumed_shards:
        table.add_row("shards resumed", str(summary.resumed_shards))
    return table

