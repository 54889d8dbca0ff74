"""`distill train`: the training loop around the compiled step, writing a students/<run>
directory (its layout: `distill.runs`).

Rerunning the same command resumes from the latest checkpoint: parameters, optimizer state, step
and data position, so the result equals an uninterrupted run. SIGTERM / SIGINT save a checkpoint
before exiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tensorboardX import SummaryWriter

from distill import multihost
from distill.config import load_config, validate
from distill.errors import DistillError
from distill.fsutil import FREE, writing
from distill.models import lora
from distill.models.llama.config import DenseConfig
from distill.parallel import make_mesh, params_sharding, parse_mesh, shard_module
from distill.pretrained import load_pretrained
from distill.runs import (
    CHECKPOINTS,
    METRICS,
    TENSORBOARD,
    TOKEN_CACHE,
    abstract_with_shardings,
    base_fingerprint,
    check_base,
    write_run_files,
)
from distill.tokenizer import Tokenizer
from distill.train.checkpoint import Checkpoints, safe_words
from distill.train.config import TrainConfig, check_layout, check_seq_len
from distill.train.data import DataState, TrainData
from distill.train.flops import dense_flops_per_token
from distill.train.losses import make_loss_fn, make_onpolicy_loss_fn
from distill.train.optim import make_optimizer, schedule
from distill.train.prefetch import Prefetch
from distill.train.progress import TrainProgress
from distill.train.rollouts import Rollouts, is_onpolicy, onpolicy_before
from distill.train.step import (
    TrainState,
    batch_sharding,
    compile_step,
    make_step,
    split_trainable,
    state_sharding,
)
from distill.train.teacher_vocab import check_teacher_vocabulary


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]  # the logged training losses of this session, in order
    stopped: bool  # ended by a signal before the last step


def init_distributed(cfg) -> None:
    """jax.distributed.initialize from the config, else from DISTILL_* variables, else JAX's own
    cluster detection when a cluster is present (a single process needs nothing)."""
    addr, num, pid = distributed_settings(cfg)
    if addr is None:
        return
    multihost.initialize(addr, num, pid, lost_after_s=lost_after_s(cfg))


def lost_after_s(cfg) -> int:
    """How long a silent process may go before the others call it lost (`distributed` section)."""
    return (cfg and cfg.lost_after_s) or multihost.LOST_AFTER_S


def distributed_settings(cfg) -> tuple[str | None, int | None, int | None]:
    """(coordinator address, number of processes, this process's id) from the config's
    `distributed` section, else the DISTILL_* variables (None where neither says)."""
    env = os.environ
    addr = (cfg and cfg.coordinator_address) or env.get("DISTILL_COORDINATOR")
    num = (cfg and cfg.num_processes) or int(env.get("DISTILL_NUM_PROCESSES", "0")) or None
    pid = cfg.process_id if cfg and cfg.process_id is not None else env.get("DISTILL_PROCESS_ID")
    return addr, num, None if pid is None else int(pid)


def load_student(cfg: TrainConfig, mesh):
    """(model, tokenizer, base) placed sharded on `mesh`; with `student.lora`, the adapters (and
    the quantised base) added to the loaded base, and `base` what its checkpoints name
    ({"init", "fingerprint"}); None for a full fine-tune."""
    s = cfg.student
    # a LoRA run as `init` starts as its merged model (its adapters folded into its base)
    model, tokenizer = load_pretrained(s.init, param_dtype=s.param_dtype,
                                       dtype=s.compute_dtype(jax.default_backend()), mesh=mesh,
                                       seed=cfg.train.seed, merge=True)
    if s.tokenizer:
        tokenizer = Tokenizer.from_pretrained(s.tokenizer)
    if tokenizer is None:
        raise DistillError(f"{s.init}: no tokenizer with this model; set student.tokenizer")
    update = s.model_updates()
    if update:  # validated again: a bad value names the field
        mc = model.config
        model.config = validate(type(mc), {**mc.model_dump(), **update}, "student.config_overrides")
    base = None
    if s.lora is not None:
        base = {"init": str(s.init), "fingerprint": base_fingerprint(model)}
        lora.adapt(model, s.lora, s.quantize, jax.random.key(cfg.train.seed))
        shard_module(model, mesh)  # the adapters and quantised weights, where their names say
    return model, tokenizer, base


class MetricsLog:
    """metrics.jsonl and TensorBoard events (written by process 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.jsonl = open(run_dir / METRICS, "a")
            self.tb = SummaryWriter(str(run_dir / TENSORBOARD))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit (a second signal is default)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old[signum])

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _device_batch(batch: dict, sharding) -> dict:
    """This process's rows -> global arrays sharded over the mesh's batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def run_train(config_path: str | Path, overrides=(), *, progress: bool = True,
              stop_after: int | None = None, devices=None) -> TrainResult:
    """Train (or resume) the run a config describes. `stop_after`: end this session after that
    many steps (the checkpoint logic is a preemption's); `devices`: the devices of the mesh
    (default: all)."""
    config_path = Path(config_path)
    cfg = resolved_config(config_path, overrides)
    init_distributed(cfg.distributed)
    multihost.on_lost(lambda: lost_host_words(cfg))
    with multihost.Watchdog(lost_after_s(cfg.distributed)) as watchdog:
        try:
            return _train(cfg, config_path, progress, stop_after, devices)
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() > 1:
                why = multihost.peer_gone(e)
                if why is not None:
                    multihost.lost_process(why)
                watchdog.settle()
            raise


def resolved_config(config_path: str | Path, overrides=()) -> TrainConfig:
    """The run's config, validated, its name set (default: the config file's stem)."""
    config_path = Path(config_path)
    cfg = load_config(TrainConfig, config_path, overrides, check_paths=True)
    if cfg.name is None:  # the resolved config keeps the name
        cfg = cfg.model_copy(update={"name": config_path.stem})
    return cfg


def lost_host_words(cfg: TrainConfig) -> str:
    """What a lost process leaves safe, and what to do then (the end of its error line)."""
    return safe_words(Path(cfg.output_root) / cfg.name / CHECKPOINTS,
                      "restart every process with the same command")


def _train(cfg: TrainConfig, config_path: Path, progress: bool, stop_after: int | None,
           devices) -> TrainResult:
    run_dir = Path(cfg.output_root) / cfg.name
    devices = list(devices if devices is not None else jax.devices())
    mesh = make_mesh(parse_mesh(cfg.mesh) if cfg.mesh else {"fsdp": len(devices)}, devices)
    source = str(config_path)
    if cfg.data is not None:
        check_layout(cfg.data.batch_size, cfg.train.grad_accum, dict(mesh.shape), source,
                     cfg.data.seq_len)
    if cfg.onpolicy is not None:
        check_layout(cfg.onpolicy.rows(), cfg.train.grad_accum, dict(mesh.shape),
                     f"{source}: onpolicy (prompts_per_step x group_size rows)")
    lead = jax.process_index() == 0

    model, tokenizer, base = load_student(cfg, mesh)
    cache_root = Path(cfg.output_root) / TOKEN_CACHE
    data = heldout = None
    if cfg.data is not None:
        check_seq_len(cfg.data.seq_len, model.config, source)
        check_teacher_vocabulary(cfg.data.traces, tokenizer, cfg.loss, cfg.data.top_k)
        data = TrainData.from_config(cfg.data, tokenizer, jax.process_index(),
                                     jax.process_count(), cache_root=cache_root,
                                     progress=progress)
        heldout = _heldout_data(cfg, tokenizer, cache_root)
    rollouts = (Rollouts(cfg.onpolicy, model, tokenizer, cfg.train.seed, mesh, source)
                if cfg.onpolicy is not None else None)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * data.steps_per_epoch(0)))
    tx = make_optimizer(cfg.optim, total)
    sched = schedule(cfg.optim, total)
    graphdef, params, frozen = split_trainable(model)
    state_sh = state_sharding(graphdef, tx, params, mesh)
    frozen_sh = params_sharding(frozen, mesh)
    params, frozen = jax.device_put(params, state_sh.params), jax.device_put(frozen, frozen_sh)
    state = TrainState(params, jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
                       jax.device_put(jnp.zeros((), jnp.int32), state_sh.step))
    loss_fn = make_loss_fn(cfg.loss)
    step_fn = compile_step(make_step(graphdef, tx, loss_fn, sched, cfg.train.grad_accum),
                           state_sh, mesh, frozen_sh)
    onpolicy_fn = None if rollouts is None else compile_step(
        make_step(graphdef, tx, make_onpolicy_loss_fn(rollouts.divergence()), sched,
                  cfg.train.grad_accum), state_sh, mesh, frozen_sh)
    eval_jit = jax.jit(lambda p, b, f: loss_fn(nnx.merge(graphdef, p, f), b))

    def eval_fn(p, b):  # the frozen base an argument, not a constant of the program
        return eval_jit(p, b, frozen)

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(run_dir / CHECKPOINTS, cfg.train.keep_checkpoints,
                        cfg.train.async_checkpoints)
    data_state = DataState()
    restored = ckpts.restore(abstract_with_shardings(state, state_sh))
    if restored is not None:
        restored_step, state, extra = restored
        check_base(extra, base and base["fingerprint"], cfg.student.init,
                   f"{run_dir / CHECKPOINTS}/{restored_step}")
        data_state = DataState.from_dict(extra["data"])
    elif lead:
        with writing(run_dir, f"nothing was trained yet; {FREE} and rerun the same command"):
            write_run_files(run_dir, cfg, model, tokenizer)
    model_cfg = model.config
    del model, params

    safe = ckpts.safe  # what a failed write leaves, in its error line
    with writing(run_dir / METRICS, safe):
        log = MetricsLog(run_dir, lead)
    b_sh = batch_sharding(mesh)
    start = int(state.step)
    seq_len = cfg.data.seq_len if cfg.data is not None else rollouts.seq_len
    flops_tok = _flops_per_token(model_cfg, seq_len)
    stats = data.pack_stats(0) if data is not None else None
    onp = _OnPolicy(cfg, rollouts, start, b_sh)

    logged, stopped = [], False

    def prepare(item):  # on the prefetch thread: pack, count, copy to the devices
        batch, after = item
        tokens = int((batch["segment_ids_bt"] > 0).sum()) * jax.process_count()
        return _device_batch(batch, b_sh), after, tokens

    stream = map(prepare, data.batches(data_state)) if data is not None else iter(())
    t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
    # under the mesh, the model's activation constraints (sequence over `tensor`) take effect
    with writing(run_dir, safe), _closing_on_error(ckpts), jax.set_mesh(mesh), \
            StopFlag() as flag, \
            TrainProgress(total, start, enabled=progress and lead) as bar, \
            (Prefetch(stream, depth=cfg.train.prefetch) if cfg.train.prefetch and data is not None
             else contextlib.nullcontext(stream)) as batches:
        for step in range(start, total):
            if onp.due(step):
                device_batch, tokens = onp.batch(step, nnx.merge_state(state.params, frozen))
                state, metrics = onpolicy_fn(state, device_batch, frozen)
            else:
                device_batch, data_state, tokens = next(batches)
                state, metrics = step_fn(state, device_batch, frozen)
            tokens_since += tokens
            steps_since += 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t_last
                m["tokens_per_s"] = tokens_since / dt
                m["flops_per_s"] = flops_tok * tokens_since / dt
                m["step_s"] = dt / steps_since
                if stats is not None:
                    m["packing_efficiency"] = stats.efficiency
                m.update(onp.window_metrics(dt))
                t_last, tokens_since, steps_since = time.perf_counter(), 0, 0
                logged.append(m["loss"])
                log.write(done, m)
                bar.update(done, m)
            if heldout is not None and (done % cfg.train.eval_every == 0 or done == total):
                ev = _heldout_loss(eval_fn, state.params, heldout, cfg.train.eval_batches, b_sh)
                log.write(done, {"heldout_loss": ev})
                bar.note(f"step {done}: held-out loss {ev:.4f}")
            extra = {"data": data_state.to_dict(), "seed": cfg.train.seed,
                     "onpolicy_steps": onp.count, **({"base": base} if base else {})}
            halt = flag.signal is not None or (stop_after is not None and done - start >= stop_after)
            if done % cfg.train.checkpoint_every == 0 or done == total or halt:
                ckpts.save(done, state, extra, force=True)
            if halt:
                stopped = flag.signal is not None
                break
    with writing(run_dir, safe):
        ckpts.close()
        log.close()
    onp.close()
    return TrainResult(run_dir, int(state.step), logged, stopped)


class _OnPolicy:
    """The on-policy side of the loop: which steps are on-policy (GKD's lambda, drawn per step
    from the seed), their batches from the rollouts, and the rollout metrics of a log window."""

    def __init__(self, cfg: TrainConfig, rollouts: Rollouts | None, start: int, sharding):
        self.rollouts, self.sharding = rollouts, sharding
        self.seed = cfg.train.seed
        self.fraction = cfg.onpolicy.fraction if cfg.onpolicy is not None else 0.0
        # where the prompt stream stands: the on-policy steps before `start`
        self.count = onpolicy_before(self.seed, start, self.fraction) if rollouts else 0
        self._window: list[dict[str, float]] = []

    def due(self, step: int) -> bool:
        return self.rollouts is not None and is_onpolicy(self.seed, step, self.fraction)

    def batch(self, step: int, weights) -> tuple[dict, int]:
        """The device batch of on-policy step `step` and its completion tokens (all processes);
        each process puts its own share of the rows."""
        rollout = self.rollouts.make(step, self.count, weights)
        self.count += 1
        self._window.append(rollout.metrics)
        n, p = jax.process_count(), jax.process_index()
        rows = {k: v[p * len(v) // n:(p + 1) * len(v) // n] for k, v in rollout.batch.items()}
        tokens = int(rollout.batch["loss_mask_bt"].sum())
        return _device_batch(rows, self.sharding), tokens

    def window_metrics(self, seconds: float) -> dict[str, float]:
        """The mean rollout metrics since the last log, and the share of the window's wall time
        spent sampling and scoring."""
        if not self._window:
            return {}
        out = {k: float(np.mean([m[k] for m in self._window])) for k in self._window[0]}
        spent = sum(m["rollout_s"] + m["score_s"] for m in self._window)
        out["rollout_share"] = spent / max(seconds, 1e-9)
        self._window = []
        return out

    def close(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()


@contextlib.contextmanager
def _closing_on_error(ckpts: Checkpoints):
    """On an error in the loop, let a checkpoint in flight land before the error propagates."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            ckpts.close()
        raise


def _flops_per_token(model_cfg, seq_len: int) -> float:
    """Analytic training FLOPs per token (dense students; 0 where not counted)."""
    return dense_flops_per_token(model_cfg, seq_len) if isinstance(model_cfg, DenseConfig) else 0.0


def _heldout_data(cfg: TrainConfig, tokenizer, cache_root: Path) -> TrainData | None:
    if cfg.data.heldout_fraction <= 0:
        return None
    try:
        return TrainData.from_config(cfg.data, tokenizer, jax.process_index(),
                                     jax.process_count(), split="heldout", cache_root=cache_root)
    except DistillError as e:  # too few prompts to hold any out: train without the eval loss
        print(f"warning: no held-out traces ({e}); the held-out loss is not computed")
        return None


def _heldout_loss(eval_fn, params, data: TrainData, batches: int, sharding) -> float:
    """Mean loss per target token over the first `batches` held-out batches (a fixed set)."""
    total = tokens = 0.0
    for i in range(min(batches, data.steps_per_epoch(0))):
        loss_sum, sums = eval_fn(params, _device_batch(data.batch(0, i), sharding))
        total += float(loss_sum)
        tokens += float(sums["tokens"])
    return total / max(tokens, 1.0)
