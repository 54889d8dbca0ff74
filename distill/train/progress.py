"""The live progress bar of `distill train`."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Steps done (of all), the last logged loss, grad norm, learning rate and tokens/s, ETA."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("steps · loss {task.fields[loss]} · gnorm {task.fields[gnorm]} · "
                       "lr {task.fields[lr]} · {task.fields[tps]} tok/s"),
            TimeRemainingColumn(), console=self.console, disable=not enabled)
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-",
                                      gnorm="-", lr="-", tps="-")
        self.enabled = enabled

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, m: dict) -> None:
        self.bar.update(self.task, completed=step, loss=f"{m['loss']:.4f}",
                        gnorm=f"{m['grad_norm']:.3g}", lr=f"{m['lr']:.3g}",
                        tps=f"{m['tokens_per_s']:.0f}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.console.print(text)
