"""Keeping orbax's own reports of a failed checkpoint write off stderr: the error line that
`distill.train.checkpoint.Checkpoints` raises says it once. Not done on import: the command line
calls `quiet_orbax_logs()` once at startup (this module imports no JAX, so `--help` stays fast)."""

from __future__ import annotations

import logging
import sys
import traceback

from distill.fsutil import write_error


class _QuietWriteErrors(logging.Filter):
    """orbax logs a failed write with a traceback from each of its threads (absl), and asyncio
    each of its failed writes' tasks; the error line that `Checkpoints` raises says it once. Kept
    for the rest of the process: those tasks are logged when they are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return write_error(exc or Exception(record.getMessage())) is None


def _closed_loop(exc) -> bool:
    """A callback into orbax's event loop after orbax closed it (see `_quiet_abandoned_writes`)."""
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f.name == "call_soon_threadsafe" for f in frames)


def _quiet_abandoned_writes() -> None:
    """When a save fails, tensorstore still settles the abandoned writes' futures on orbax's
    event loop, closed by then, from its own threads: Python prints each RuntimeError with a
    traceback (through sys.excepthook or, from C, as unraisable). Those alone are dropped, for
    the rest of the process: the error line says what happened."""
    if getattr(sys.excepthook, "distill_quiet", False):
        return
    except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook

    def on_except(kind, exc, tb) -> None:
        if not _closed_loop(exc):
            except_hook(kind, exc, tb)

    def on_unraisable(u) -> None:
        if not _closed_loop(u.exc_value):
            unraisable_hook(u)

    on_except.distill_quiet = True
    sys.excepthook, sys.unraisablehook = on_except, on_unraisable


def _quiet_write_errors() -> None:
    for name in ("absl", "asyncio"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _QuietWriteErrors) for f in log.filters):
            log.addFilter(_QuietWriteErrors())


def quiet_orbax_logs() -> None:
    """For the rest of the process, drop orbax's (absl's, asyncio's) logged tracebacks of a
    failed write and the "Event loop is closed" errors of its abandoned writes, nothing else.
    Idempotent; the command line calls it once at startup."""
    _quiet_write_errors()
    _quiet_abandoned_writes()
