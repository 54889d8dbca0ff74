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
process reads its own shards of a checkpoint, so one process's files can be damaged while
another's are whole: the processes restore in step (`distill.runs.agreed`), every one trying
the same step and telling the others whether it could, and go on to an older step together when
any could not (process 0 says which, in one line); none keeps a state before all have read the
same step."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from distill.fsutil import FREE, WriteFailed, write_error
from distill.runs import (
    agreed,
    checksums,
    committed_steps,
    first_process,
    log_stderr,
    read_item,
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

        def one(step: int):
            out = agreed(step, lambda: self._read(step, abstract_state))
            verify_checksums(out.state, out.extra.get("checksums"), f"{self.directory}/{step}")
            return out

        say = first_process(log)  # every process would say the same lines
        listed = committed_steps(self.directory)  # before process 0 may move any aside
        step, out = restore_newest(self.directory, one, log=say)
        newer = [s for s in listed if s > step]
        if newer:
            if jax.process_index() == 0:
                for s in newer:
                    (self.directory / str(s)).rename(self.directory / f"{s}{UNRESTORABLE}")
            say(f"warning: resuming from step {step}; moved the newer checkpoint(s) "
                f"{', '.join(map(str, newer))} aside to <step>{UNRESTORABLE}")
            if jax.process_count() > 1:  # every process sees the renames before it reloads
                multihost_utils.sync_global_devices("distill: unrestorable checkpoints moved")
            self.manager.reload()
        return step, out.state, out.extra

    def _read(self, step: int, abstract_state):
        """This process's part of checkpoint `step` (see `distill.runs.read_item`)."""
        return read_item(self.directory / str(step),
                         ocp.CompositeCheckpointHandler(state=ocp.StandardCheckpointHandler(),
                                                        extra=ocp.JsonCheckpointHandler()),
                         ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            extra=ocp.args.JsonRestore()))

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
