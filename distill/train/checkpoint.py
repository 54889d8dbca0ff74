"""Training checkpoints with orbax: asynchronous saves every k steps, the last n kept, and a save
on SIGTERM / SIGINT. A checkpoint holds the whole TrainState (parameters, optimizer state, step) and,
as JSON, the data position, the run's seed and a checksum of every array, so a resumed run continues
bit for bit and a corrupted checkpoint is detected instead of half-loaded.

Resuming takes the newest checkpoint that restores and matches its checksums; a newer one that does
not is moved aside (to `<step>.unrestorable`) with one line. A save that fails for want of space (or
any other write error) removes its temporary folder and ends in one line naming the checkpoint that
is safe.

On several hosts every process calls save/restore (orbax coordinates who writes what)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import traceback
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from distill.fsutil import FREE, WriteFailed, write_error
from distill.runs import (
    checksums,
    committed_steps,
    log_stderr,
    restore_newest,
    verify_checksums,
)

UNRESTORABLE = ".unrestorable"  # suffix of a checkpoint folder moved aside


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


class Checkpoints:
    """students/<run>/checkpoints/<step>/{state, extra} (the layout of `distill.runs`; a finished
    run's parameters are read back by `distill.runs.load_run`)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                            enable_async_checkpointing=async_save)
        self._remove_temporaries()  # a save killed midway (kill -9, a lost host) left them
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self._saving: int | None = None  # the step of the save in flight
        _quiet_write_errors()
        _quiet_abandoned_writes()

    def latest(self) -> int | None:
        steps = committed_steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state, extra: dict, force: bool = False) -> None:
        """Start saving (asynchronously); `extra` is JSON (data position, seed...)."""
        extra = {**extra, "checksums": checksums(state)}
        self.wait()  # the previous save's failure names its own step
        self._saving = step
        with self._failing(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            extra=ocp.args.JsonSave(extra)),
                              force=force)

    def restore(self, abstract_state, log=log_stderr):
        """(step, state, extra) of the newest checkpoint that restores and matches its
        checksums, or None when there is none. `abstract_state`: ShapeDtypeStructs with
        shardings, so every array is restored straight into its sharded layout. Newer checkpoints
        that fail are moved aside (process 0) so that the run's next saves replace them."""
        if self.latest() is None:
            return None

        def one(step: int):
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
            verify_checksums(out.state, out.extra.get("checksums"), f"{self.directory}/{step}")
            return out

        step, out = restore_newest(self.directory, one, log=log)
        newer = [s for s in committed_steps(self.directory) if s > step]
        if newer:
            if jax.process_index() == 0:
                for s in newer:
                    (self.directory / str(s)).rename(self.directory / f"{s}{UNRESTORABLE}")
            log(f"warning: resuming from step {step}; moved the newer checkpoint(s) "
                f"{', '.join(map(str, newer))} aside to <step>{UNRESTORABLE}")
            if jax.process_count() > 1:  # every process sees the renames before it reloads
                multihost_utils.sync_global_devices("distill: unrestorable checkpoints moved")
            self.manager.reload()
        return step, out.state, out.extra

    def wait(self) -> None:
        with self._failing(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _failing(self, step: int | None):
        """A failed write inside a save (or the wait for an asynchronous one) -> its temporary
        folder removed and one WriteFailed line naming the checkpoint that is safe."""
        try:
            yield
        except Exception as e:
            reason = write_error(e)
            if reason is None:
                raise
            self._remove_temporaries()
            step = self._saving if step is None else step
            raise WriteFailed(self.directory / str(step), reason, self.safe()) from e

    def _remove_temporaries(self) -> None:
        """The folders of saves that did not commit (process 0 removes them for all)."""
        if jax.process_index() == 0:
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def safe(self, then: str = f"{FREE} and rerun the same command") -> str:
        return safe_words(self.directory, then)


def safe_words(directory: Path, then: str = f"{FREE} and rerun the same command") -> str:
    """What a fault during training leaves safe (the newest committed checkpoint in
    `directory`), and `then` what to do, in words: the end of its error line."""
    steps = committed_steps(directory)
    if not steps:
        return f"no checkpoint was saved yet; {then} to start again"
    return f"the checkpoint of step {steps[-1]} is safe; {then} to resume from it"
