"""Training checkpoints with orbax: asynchronous saves every k steps, the last n kept, and a save
on SIGTERM / SIGINT. A checkpoint holds the whole TrainState (parameters, optimizer state, step) and,
as JSON, the data position, the run's seed and a checksum of every array, so a resumed run continues
bit for bit and a corrupted checkpoint is detected instead of half-loaded.

Resuming takes the newest checkpoint that restores and matches its checksums; a newer one that does
not is moved aside (to `<step>.unrestorable`) with one line. A save that fails for want of space (or
any other write error) removes its temporary folder and ends in one line naming the checkpoint that
is safe (`distill.train.orbax_logs.quiet_orbax_logs`, called by the command line, keeps orbax's own
tracebacks of it off stderr).

On several hosts every process calls save/restore (orbax coordinates who writes what). Each
process reads its own shards of a checkpoint, so one process's files can be damaged while another's
are whole: the processes restore in step (`agreed`), every one trying the same step and telling
the others whether it could, and go on to an older step together when any could not (process 0
says which, in one line); none keeps a state before all have read the same step."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from distill.errors import DistillError
from distill.fsutil import FREE, WriteFailed, write_error
from distill.runs import (
    checksums,
    committed_steps,
    log_stderr,
    restore_newest,
    verify_checksums,
)

UNRESTORABLE = ".unrestorable"  # suffix of a checkpoint folder moved aside


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
        several = jax.process_count() > 1

        def one(step: int):
            where = f"{self.directory}/{step}"
            out = agreed(step, lambda: self._read(step, abstract_state)) if several else \
                self.manager.restore(step, args=self._args(abstract_state))
            verify_checksums(out.state, out.extra.get("checksums"), where)  # same on all
            return out

        if several:  # every process logs the same lines: process 0 says them
            log = _first_process(log)
        listed = committed_steps(self.directory)  # before process 0 may move any aside
        step, out = restore_newest(self.directory, one, log=log)
        newer = [s for s in listed if s > step]
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

    @staticmethod
    def _args(abstract_state):
        return ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  extra=ocp.args.JsonRestore())

    def _read(self, step: int, abstract_state):
        """This process's part of checkpoint `step`, read without the manager's closing barrier
        (a process whose read fails must not leave the others waiting there)."""
        handler = ocp.CompositeCheckpointHandler(state=ocp.StandardCheckpointHandler(),
                                                 extra=ocp.JsonCheckpointHandler())
        try:
            return handler.restore(self.directory / str(step), args=self._args(abstract_state))
        finally:
            handler.close()

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


def agreed(step: int, read):
    """`read()` on every process at once, for checkpoint `step`; its result where every process
    read the same step, else a DistillError on every process naming those that could not and
    why (so that all of them go on to the same older step)."""
    why = ""
    try:
        out = read()
    except Exception as e:  # noqa: BLE001 - any failure to read means this step is not restorable
        why = _first_line(e)
        if e.__cause__ is not None:
            why += f" ({_first_line(e.__cause__)})"
    told = [_decode(row) for row in multihost_utils.process_allgather(_encode(step, why))]
    if len({s for s, _ in told}) > 1:
        raise DistillError("the processes see different checkpoints (steps "
                           f"{', '.join(str(s) for s, _ in told)}); they need one shared directory")
    failed = [(i, w) for i, (_, w) in enumerate(told) if w]
    if failed:
        raise DistillError("; ".join(f"process {i} of {len(told)}: {w}" for i, w in failed))
    return out


_WHY_BYTES = 256


def _first_line(e: BaseException) -> str:
    """An error's first line, without TensorStore's pointer to its details."""
    line = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    return line[:200] or type(e).__name__


def _encode(step: int, why: str) -> np.ndarray:
    """(step, why) as a fixed-size int32 row (every process's row has the same shape)."""
    data = why.encode()[:_WHY_BYTES]
    return np.array([step, len(data), *data, *[0] * (_WHY_BYTES - len(data))], np.int32)


def _decode(row) -> tuple[int, str]:
    step, n = int(row[0]), int(row[1])
    return step, bytes(int(b) for b in row[2:2 + n]).decode(errors="replace")


def _first_process(log):
    return lambda line: log(line) if jax.process_index() == 0 else None


def safe_words(directory: Path, then: str = f"{FREE} and rerun the same command") -> str:
    """What a fault during training leaves safe (the newest committed checkpoint in
    `directory`), and `then` what to do, in words: the end of its error line."""
    steps = committed_steps(directory)
    if not steps:
        return f"no checkpoint was saved yet; {then} to start again"
    return f"the checkpoint of step {steps[-1]} is safe; {then} to resume from it"
