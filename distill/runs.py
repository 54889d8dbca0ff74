"""Training-run directories, `students/<run>`: their layout in one place. `distill train` writes a
run through `write_run_files` (and its checkpoints through `distill.train.checkpoint`); everything
else reads runs through the functions here.

students/<run>/
  config.yaml        the resolved training config (every path absolute, the run named)
  model.json         the student's model config (distill's schema)
  tokenizer/         the student's tokenizer (Hugging Face files, chat template included)
  checkpoints/<step> orbax: {state: TrainState, extra: {data position, seed}}
  metrics.jsonl      one JSON object per logged step (process 0 only)
  tensorboard/       the same as TensorBoard events

students/.cache/tokens/<key>/   the tokenized caches of the runs' trace mixtures (shared by every
                                run with the same traces, tokenizer and render settings:
                                `distill.data.tokens`)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from distill.config import ModelFile, save_config, validate
from distill.errors import DistillError
from distill.fsutil import write_atomic
from distill.models import hf
from distill.parallel import state_shardings
from distill.tokenizer import Tokenizer

CONFIG = "config.yaml"
MODEL = "model.json"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TOKEN_CACHE = ".cache/tokens"  # under the output root


def is_run(path: str | Path) -> bool:
    """Whether `path` is a training-run directory (a model config and a checkpoints folder)."""
    p = Path(path)
    return (p / MODEL).is_file() and (p / CHECKPOINTS).is_dir()


def write_run_files(run_dir: Path, cfg, model, tokenizer) -> None:
    """The resolved training config, the model config and the tokenizer, beside the checkpoints."""
    save_config(cfg, run_dir / CONFIG)  # `distill train` reruns it from any directory
    write_atomic(run_dir / MODEL, model.config.model_dump_json(indent=2).encode())
    tokenizer.save_pretrained(run_dir / TOKENIZER)


def read_config(run_dir: str | Path) -> dict:
    """The run's resolved training config as plain data ({} when it has none)."""
    path = Path(run_dir) / CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def read_tokenizer(run_dir: str | Path):
    """The run's tokenizer, or None when it has none."""
    path = Path(run_dir) / TOKENIZER
    return Tokenizer.from_pretrained(path) if path.is_dir() else None


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs of `state` (concrete or abstract) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def latest_step(run_dir: str | Path) -> int | None:
    """The newest checkpoint's step, or None."""
    manager = ocp.CheckpointManager(Path(run_dir, CHECKPOINTS).absolute())
    try:
        return manager.latest_step()
    finally:
        manager.close()


def load_run(run_dir: str | Path, *, param_dtype: str = "float32", dtype: str = "float32",
             mesh=None, step: int | None = None):
    """(model, tokenizer) from a students/<run> directory: its model config, the parameters of its
    latest checkpoint (or `step`), placed sharded on `mesh` when given, and its tokenizer."""

    run_dir = Path(run_dir)
    data = json.loads((run_dir / MODEL).read_text())
    data.update(param_dtype=param_dtype, dtype=dtype)
    cfg = validate(ModelFile, {"model": data}, str(run_dir / MODEL)).model
    abstract = hf.abstract_model(cfg)
    graphdef, params = nnx.split(abstract)
    step = latest_step(run_dir) if step is None else step
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
        Path(run_dir, CHECKPOINTS).absolute() / str(step) / "state",
        args=ocp.args.PyTreeRestore(item={"params": stored}, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                                        {"params": stored})))
    params = jax.tree.map(lambda x, t: x.astype(t.dtype), restored["params"], target)
    return nnx.merge(graphdef, params), read_tokenizer(run_dir)
