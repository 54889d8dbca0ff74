"""Training checkpoints with orbax: asynchronous saves every k steps, the last n kept, and a save
on SIGTERM / SIGINT. A checkpoint holds the whole TrainState (parameters, optimizer state, step) and,
as JSON, the data position and the run's seed, so a resumed run continues bit for bit.

On several hosts every process calls save/restore (orbax coordinates who writes what)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from distill.errors import DistillError


class Checkpoints:
    """students/<run>/checkpoints/<step>/{state, extra}."""

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


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs of `state` (concrete or abstract) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def load_run(run_dir: str | Path, *, param_dtype: str = "float32", dtype: str = "float32",
             mesh=None, step: int | None = None):
    """(model, tokenizer) from a students/<run> directory: its model config, the parameters of its
    latest checkpoint (or `step`), placed sharded on `mesh` when given, and its tokenizer."""
    import json

    import jax.numpy as jnp
    from flax import nnx

    from distill.config import ModelFile, validate
    from distill.models import hf
    from distill.parallel import state_shardings
    from distill.tokenizer import Tokenizer

    run_dir = Path(run_dir)
    data = json.loads((run_dir / "model.json").read_text())
    data.update(param_dtype=param_dtype, dtype=dtype)
    cfg = validate(ModelFile, {"model": data}, str(run_dir / "model.json")).model
    abstract = hf.abstract_model(cfg)
    graphdef, params = nnx.split(abstract)
    ckpts = Checkpoints(run_dir / "checkpoints", async_save=False)
    step = ckpts.latest() if step is None else step
    if step is None:
        raise DistillError(f"{run_dir}: no checkpoint yet")
    shardings = (state_shardings(params, mesh) if mesh is not None
                 else jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                   params))
    target = abstract_with_shardings(params, shardings)
    # checkpoints hold float32 master weights; restore as stored, then cast to param_dtype
    stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                          target)
    restored = ocp.PyTreeCheckpointer().restore(
        ckpts.directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(item={"params": stored}, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                                        {"params": stored})))
    params = jax.tree.map(lambda x, t: x.astype(t.dtype), restored["params"], target)
    ckpts.close()
    tokenizer = (Tokenizer.from_pretrained(run_dir / "tokenizer")
                 if (run_dir / "tokenizer").is_dir() else None)
    return nnx.merge(graphdef, params), tokenizer
