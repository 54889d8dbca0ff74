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

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.experimental import multihost_utils

from distill.config import save_config, validate
from distill.errors import DistillError
from distill.fsutil import write_atomic
from distill.models.families import ModelFile, abstract_model
from distill.parallel import params_sharding
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


def committed_steps(checkpoints: str | Path) -> list[int]:
    """The steps of a checkpoints/ folder's committed checkpoints, oldest first (orbax renames a
    step's folder to its bare number only once the whole step is written)."""
    p = Path(checkpoints)
    return sorted(int(d.name) for d in p.iterdir() if d.name.isdigit()) if p.is_dir() else []


def _leaf_name(path) -> str:
    keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(k) for k in keys)


def _sums(leaves: list) -> list:
    """Per leaf, the wrapping uint32 sum of its elements' bit patterns (a changed bit changes it)."""
    def one(x):
        bits = x.dtype.itemsize * 8
        u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
        if bits == 64:  # fold the halves
            u = (u >> 32) ^ (u & 0xFFFFFFFF)
        return jnp.sum(u.astype(jnp.uint32), dtype=jnp.uint32)
    return [one(x) for x in leaves]


_leaf_sums = jax.jit(_sums)
# in bfloat16 (cast inside the program, never a copy of the whole tree): a float32 and a bfloat16
# load of the same checkpoint agree
_bf16_leaf_sums = jax.jit(lambda leaves: _sums([x.astype(jnp.bfloat16) for x in leaves]))


def base_fingerprint(model) -> str:
    """A short hash of a model's parameters as bfloat16: what a LoRA run's checkpoints name as
    the base their adapters belong to (the same for a float32 or bfloat16 load of one base)."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    sums = jax.device_get(_bf16_leaf_sums([x for _, x in flat]))
    named = {_leaf_name(p): int(v) for (p, _), v in zip(flat, sums, strict=True)}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]


def check_base(extra: dict, fingerprint: str | None, init, where: str) -> None:
    """DistillError when a checkpoint's adapters belong to another base than `init` (whose
    fingerprint is `fingerprint`); a checkpoint that names no base passes."""
    base = extra.get("base")
    if not base or fingerprint is None or base.get("fingerprint") == fingerprint:
        return
    raise DistillError(f"{where}: its adapters were trained on the base {base.get('init')} "
                       f"(fingerprint {base.get('fingerprint')}), not on {init} ({fingerprint}); "
                       "point student.init at that base")


def checksums(tree) -> dict[str, int]:
    """{leaf path ('params/layers/attn/wq_dnh/value'): checksum} of a pytree of arrays, computed
    where the arrays live (sharded arrays on every process alike). A checkpoint stores them beside
    its state so that a restore can tell a corrupted checkpoint from a good one."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_leaf_sums([x for _, x in flat]))
    return {_leaf_name(p): int(v) for (p, _), v in zip(flat, sums, strict=True)}


def verify_checksums(tree, expected: dict[str, int] | None, where: str) -> None:
    """Raise DistillError naming the first leaf of `tree` whose checksum is not `expected`'s
    (leaves `expected` does not list, and checkpoints written before checksums, pass)."""
    if not expected:
        return
    for name, value in checksums(tree).items():
        if name in expected and expected[name] != value:
            raise DistillError(f"{where}: {name} does not match its checksum (the checkpoint is "
                               "corrupted)")


def log_stderr(line: str) -> None:
    """The default `log` of the functions here: one line to stderr."""
    print(line, file=sys.stderr, flush=True)


T = TypeVar("T")


def restore_newest(checkpoints: Path, restore: Callable[[int], T], *, step: int | None = None,
                   log: Callable[[str], None] = log_stderr) -> tuple[int, T]:
    """(step, restore(step)) of the newest committed checkpoint that restores, or of `step` alone
    when given. A checkpoint that fails (a truncated file, a checksum that does not match) gets one
    line in `log` and the previous kept one is tried; DistillError when none restores."""
    steps = [step] if step is not None else committed_steps(checkpoints)[::-1]
    if not steps:
        raise DistillError(f"{checkpoints}: no checkpoint yet")
    failures = []
    for i, s in enumerate(steps):
        try:
            return s, restore(s)
        except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means the next
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            failures.append(f"{s}: {why}")
            if i + 1 < len(steps):
                log(f"warning: {checkpoints}/{s} cannot be restored ({why}); trying step "
                    f"{steps[i + 1]}")
    raise DistillError(f"{checkpoints}: no checkpoint can be restored ({'; '.join(failures)})")


def agreed(step: int, read: Callable[[], T]) -> T:
    """`read()` of checkpoint `step`, on every process of a run at once: its result where every
    process could read the same step, else a DistillError on every process naming those that
    could not and why, so that all of them go on to the same older step together (each process
    reads its own part of a checkpoint: one's files can be damaged where another's are whole).
    With one process, `read()` as it is."""
    if jax.process_count() == 1:
        return read()
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


def first_process(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` on process 0, nothing elsewhere (for lines every process would say alike)."""
    return lambda line: log(line) if jax.process_index() == 0 else None


def read_item(path: Path, handler, args):
    """`handler.restore(path, args)`: this process's part of one orbax checkpoint, read without
    a Checkpointer's closing barrier, so that a process whose read fails does not leave the
    others waiting there (`agreed` brings them together)."""
    try:
        return handler.restore(path, args=args)
    finally:
        handler.close()


def read_model_config(run_dir: str | Path, **runtime):
    """The run's model config (model.json), with runtime fields (param_dtype, dtype) replaced."""
    path = Path(run_dir) / MODEL
    data = {**json.loads(path.read_text()), **runtime}
    return validate(ModelFile, {"model": data}, str(path)).model


def lora_base(run_dir: str | Path) -> str | None:
    """The base model path of a LoRA run (its config's student.init); None for any other run."""
    if not json.loads((Path(run_dir) / MODEL).read_text()).get("lora"):
        return None
    init = (read_config(run_dir).get("student") or {}).get("init")
    if not init:
        raise DistillError(f"{run_dir}: a LoRA run whose {CONFIG} names no student.init (its base)")
    return init


def load_run(run_dir: str | Path, *, param_dtype: str = "float32", dtype: str = "float32",
             mesh=None, step: int | None = None, log: Callable[[str], None] = log_stderr,
             base=None, fingerprint: str | None = None):
    """(model, tokenizer) from a students/<run> directory: its model config, the parameters of its
    newest checkpoint that restores and matches its checksums (or of `step`), placed sharded on
    `mesh` when given, and its tokenizer. `log` gets one line naming the step loaded (and one for
    each newer checkpoint that could not be).

    A LoRA run's checkpoints hold its adapters only: `base` is then the base model with adapters
    (`distill.models.lora.adapt`), whose adapters are restored, and `fingerprint` its
    `base_fingerprint` (DistillError when the checkpoint names another base)."""

    run_dir = Path(run_dir)
    if base is None:
        model, trainable = abstract_model(read_model_config(run_dir, param_dtype=param_dtype,
                                                            dtype=dtype)), nnx.Param
    else:
        model, trainable = base, nnx.LoRAParam
    graphdef, params, rest = nnx.split(model, trainable, ...)
    if mesh is not None:
        shardings = params_sharding(params, mesh)
    else:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                 params)
    target = abstract_with_shardings(params, shardings)
    # checkpoints hold float32 master weights; restore as stored, then cast to param_dtype
    stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                          target)
    checkpoints = Path(run_dir, CHECKPOINTS).absolute()
    init = (read_config(run_dir).get("student") or {}).get("init")

    def restore(s: int):
        restored = agreed(s, lambda: read_item(
            checkpoints / str(s) / "state", ocp.PyTreeCheckpointHandler(),
            ocp.args.PyTreeRestore(item={"params": stored}, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(
                                       {"params": stored}))))
        verify_checksums(restored, read_extra(checkpoints, s).get("checksums"),
                         f"{checkpoints}/{s}")
        return restored

    log = first_process(log)
    step, restored = restore_newest(checkpoints, restore, step=step, log=log)
    check_base(read_extra(checkpoints, step), fingerprint, init, f"{checkpoints}/{step}")
    log(f"{run_dir}: loaded the checkpoint of step {step}")
    params = jax.tree.map(lambda x, t: x.astype(t.dtype), restored["params"], target)
    return nnx.merge(graphdef, params, rest), read_tokenizer(run_dir)


def read_extra(checkpoints: Path, step: int) -> dict:
    """A checkpoint's JSON part (data position, seed, checksums); {} when it has none."""
    path = Path(checkpoints) / str(step) / "extra" / "metadata"
    return json.loads(path.read_text()) if path.is_file() else {}
