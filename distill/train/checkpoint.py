"""Training checkpoints with orbax: asynchronous saves every k steps, the last n kept, and a save
on SIGTERM / SIGINT. A checkpoint holds the whole TrainState (parameters, optimizer state, step) and,
as JSON, the data position and the run's seed, so a resumed run continues bit for bit.

On several hosts every process calls save/restore (orbax coordinates who writes what)."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from distill.errors import DistillError


class Checkpoints:
    """students/<run>/checkpoints/<step>/{state, extra} (the layout of `distill.runs`; a finished
    run's parameters are read back by `distill.runs.load_run`)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, extra: dict, force: bool = False) -> None:
        """Start saving (asynchronously); `extra` is JSON (data position, seed...)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        extra=ocp.args.JsonSave(extra)),
                          force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(state, extra) of `step` (default: the latest). `abstract_state`: ShapeDtypeStructs
        with shardings, so every array is restored straight into its sharded layout."""
        step = self.latest() if step is None else step
        if step is None:
            raise DistillError(f"{self.directory}: no checkpoint to restore")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistillError(f"{self.directory}/{step}: cannot restore ({first[:300]})") from e
        return out.state, out.extra

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
