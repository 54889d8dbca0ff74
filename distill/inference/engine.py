"""The slot engine: every in-process model samples through it (serve, generate, eval, sample,
rollouts, benchmarks).

A fixed number of slots each hold one sequence: its KV cache, length, remaining budget and its own
sampling settings (temperature, top-k, top-p, random stream) as data. A host visit (`step`)
admits waiting requests to free slots, writes their prompts into the cache in chunks, runs
`decode_steps` decode steps over every slot in one compiled program, hands each request its new
tokens, and frees the slots whose sample ended (end-of-sequence id, stop string, its own
`max_new_tokens`, a cancellation). A request with n samples prefills once and copies the cache.

Compiled programs come from a fixed set of shapes (prompt chunks and cache windows in buckets), so
after `warmup()` no request within the limits compiles anything; `set_weights` swaps the weights,
which are an argument of every program, without a recompile.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from pydantic import Field

from distill.config import Frozen
from distill.errors import DistillError
from distill.inference import programs
from distill.inference.completion import Completion, completion_of
from distill.inference.programs import TOP_LOGPROBS, Layout, SlotArrays
from distill.models.decoder import layer_stack_paths, unstack_layers
from distill.sampling import SamplingParams, request_key

log = logging.getLogger(__name__)

MAX_LEN_DEFAULT = 4096  # tokens per slot when neither the config nor the model says less


class EngineConfig(Frozen):
    """The engine's shape. `max_len`: prompt plus completion tokens per sequence (default: the
    model's context, at most 4,096); `prefill_chunk`: the longest prompt chunk written in one
    program (a power of two); `prefill_budget`: prompt tokens written per host visit;
    `decode_steps`: decode steps per host visit; `min_window`: the smallest cache window."""

    slots: int = Field(16, ge=1)
    max_len: int | None = Field(None, ge=2)
    prefill_chunk: int = Field(256, ge=16)
    prefill_budget: int = Field(512, ge=16)
    decode_steps: int = Field(8, ge=1)
    min_window: int = Field(128, ge=16)
    unroll: bool | None = None  # decode over unstacked layers (default: on the CPU only)


class EngineError(DistillError):
    """A request or an engine shape the engine cannot serve (one line; exit 2, HTTP 400)."""


_COMPILES = [0]


def _count_compile(event: str, _secs: float, **_kw) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compiles() -> int:
    """XLA compilations in this process so far (any program): the difference across a run is
    what it compiled."""
    return _COMPILES[0]


@partial(jax.jit, static_argnums=(0,))
def _unstack(paths, tree):
    return unstack_layers(tree, paths)


def pow2_at_least(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): the engine's bucket rule."""
    return 1 << max(x - 1, 0).bit_length()


class Request:
    """One submitted prompt with `params.n` samples. `wait()` returns its completions (prompt
    order of samples); `cancel()` ends it at the next host visit."""

    def __init__(self, rid: int, ids: list[int], params: SamplingParams, on_delta, on_done):
        self.id, self.ids, self.params = rid, ids, params
        self.on_delta, self.on_done = on_delta, on_done
        n = params.n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[tuple]] = [[] for _ in range(n)]
        self.ended: list[bool] = [False] * n
        self.cancelled = False
        self.completions: list[Completion] | None = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> list[Completion]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running")
        if self.error is not None:
            raise self.error
        return self.completions


@dataclasses.dataclass
class _Slot:
    req: Request
    sample: int
    fed: int = 0  # prompt tokens written to the cache
    decoding: bool = False


class Engine:
    """Continuous batching over `config.slots` slots for one model (dense or MoE).

    eos_ids: end-of-sequence ids (default: the model config's and the tokenizer's); tokenizer:
    for stop strings and completion texts (optional). Drive it with `step()` from one thread, or
    `start()` a worker thread; `submit` is safe from any thread.
    """

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None,
                 eos_ids: Sequence[int] | None = None):
        config = config or EngineConfig()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_ids = sorted(set(eos_ids if eos_ids is not None else stop_ids(model, tokenizer)))
        self._eos = jnp.asarray(self.eos_ids or [-1], jnp.int32)
        limit = model.config.max_position_embeddings
        self.max_len = min(config.max_len or min(limit, MAX_LEN_DEFAULT), limit)
        # room for a last prompt chunk padded to its bucket past max_len
        self.cache_len = -(-self.max_len // 16) * 16 + config.prefill_chunk
        self.chunks = sorted({c for c in (16, 64, config.prefill_chunk) if c <= config.prefill_chunk})
        self.row_buckets = sorted({min(4 ** i, config.slots) for i in range(8)})
        self.windows = sorted({min(pow2_at_least(w), self.cache_len)
                               for w in [config.min_window, *self.chunks, self.cache_len]}
                              | {w for w in (2 ** i for i in range(4, 20))
                                 if config.min_window < w < self.cache_len})
        self.unroll = jax.default_backend() == "cpu" if config.unroll is None else config.unroll
        self.layout = Layout.of(model, self.unroll)
        self.graphdef, state = nnx.split(model)
        # weights committed to their shardings, as set_weights puts new ones: a program's
        # compile key includes whether its arguments are committed
        self._shardings = jax.tree.map(lambda a: a.sharding, state)
        state = jax.device_put(state, self._shardings)
        self._paths = tuple(layer_stack_paths(model))
        self.weights = _unstack(self._paths, state) if self.unroll else state
        self._check_memory()
        cache = model.init_cache(config.slots, self.cache_len)
        self.cache = self._place(unstack_layers(cache) if self.unroll else cache)
        self._init_slots()
        self._ids = itertools.count()
        self._incoming: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.programs: set[tuple] = set()  # the (program, shape) pairs this engine has run
        self.visits = self.slot_steps = self.tokens_delivered = 0

    # -- requests

    def submit(self, ids: Sequence[int], params: SamplingParams,
               on_delta: Callable[[Request, int, list[int]], None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:
        """Queue a prompt (token ids); raises EngineError for what the engine cannot serve.
        on_delta(request, sample_index, new_ids) and on_done(request) run on the stepping thread
        after each host visit."""
        ids = [int(t) for t in ids]
        self.check(len(ids), params)
        req = Request(next(self._ids), ids, params, on_delta, on_done)
        with self._cond:
            self._incoming.append(req)
            self._cond.notify_all()
        return req

    def check(self, prompt_tokens: int, params: SamplingParams) -> None:
        """Raise EngineError unless a prompt of this length with these settings fits."""
        if prompt_tokens < 1:
            raise EngineError("a prompt needs at least one token")
        if prompt_tokens + params.max_new_tokens > self.max_len:
            raise EngineError(
                f"a prompt of {prompt_tokens} tokens plus max_tokens {params.max_new_tokens} is past "
                f"the engine's limit of {self.max_len} tokens per sequence")
        if params.n > self.config.slots:
            raise EngineError(f"n = {params.n} samples need more than the engine's "
                              f"{self.config.slots} slots")
        if params.logprobs > TOP_LOGPROBS:
            raise EngineError(f"logprobs {params.logprobs}: at most {TOP_LOGPROBS}")

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """`params.n` completions per prompt, prompt-major, run to the end on this thread.
        seeds: one per prompt (default: params.seed for all), so a prompt samples the same
        tokens whatever else runs beside it."""
        reqs = [self.submit(p, params if seeds is None else
                            params.model_copy(update={"seed": int(seeds[i])}))
                for i, p in enumerate(prompts)]
        self.run_until_idle()
        out = []
        for i, r in enumerate(reqs):
            out += [dataclasses.replace(c, prompt_index=i) for c in r.wait()]
        return out

    def run_until_idle(self) -> None:
        while self.step():
            pass

    # -- the worker thread (serve)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="distill-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(RuntimeError("the engine is shutting down"))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._busy() and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed visit fails its requests, not the engine
                log.exception("inference step failed")
                self._fail_all(e)

    def _busy(self) -> bool:
        return bool(self._incoming or self._waiting or any(self.slots))

    @property
    def pending(self) -> int:
        """Requests submitted and not yet in a slot."""
        with self._cond:
            return len(self._incoming) + len(self._waiting)

    # -- one host visit

    def step(self) -> bool:
        """Admit, prefill, decode once, hand out tokens, free finished slots. Returns whether
        any work is left."""
        with self._cond:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self.host.active.any():
            self._decode()
        self.visits += 1
        with self._cond:
            return self._busy()

    def _drop_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._finish(req)
        for i, slot in enumerate(self.slots):
            if slot is not None and slot.req.cancelled:
                self._end_sample(i)

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        while self._waiting and len(free) >= self._waiting[0].params.n:
            req = self._waiting.popleft()
            for sample in range(req.params.n):
                i = free.pop(0)
                self.slots[i] = _Slot(req, sample)
                self._set_params(i, req, sample)

    def _prefill(self) -> None:
        """Write waiting prompts into their slots, up to `prefill_budget` tokens: the first
        chunks of several prompts in one program, then later chunks of long prompts one by one.
        A prompt's last token is not written: the first decode step feeds it."""
        budget = self.config.prefill_budget
        fresh = [i for i, s in enumerate(self.slots)
                 if s is not None and s.sample == 0 and not s.decoding and s.fed == 0]
        if fresh:
            budget -= self._prefill_first(fresh, budget)
        for i, slot in enumerate(self.slots):
            if slot is None or slot.decoding or slot.sample != 0:
                continue
            left = len(slot.req.ids) - 1 - slot.fed
            while left > 0 and budget > 0 and slot.fed > 0:
                n = min(left, self.config.prefill_chunk)
                self._prefill_chunk(i, slot, n)
                left, budget = left - n, budget - n
            if left == 0:
                self._start_decoding(i, slot.req)

    def _prefill_first(self, fresh: list[int], budget: int) -> int:
        """First chunks of the prompts in slots `fresh` (those the budget allows, at least one);
        returns the tokens written."""
        chunk = self.config.prefill_chunk
        rows, used = [], 0
        for i in fresh:
            n = min(len(self.slots[i].req.ids) - 1, chunk)
            if rows and used + n > budget:
                break
            rows.append((i, n))
            used += n
        rows = [(i, n) for i, n in rows if n > 0]
        if not rows:
            return 0
        p = next(p for p in self.row_buckets if p >= len(rows))
        c = next(c for c in self.chunks if c >= max(n for _, n in rows))
        tokens = np.zeros((p, c), np.int32)
        slot_p, n_p = np.full(p, rows[0][0], np.int32), np.full(p, rows[0][1], np.int32)
        for j in range(p):
            i, n = rows[j] if j < len(rows) else rows[0]  # padding rows repeat the first
            tokens[j, :n] = self.slots[i].req.ids[:n]
            slot_p[j], n_p[j] = i, n
        self._run_first(slot_p, tokens, n_p)
        for i, n in rows:
            self.slots[i].fed = n
            self.host.lengths[i] = n  # the decode's idle writes land past the prompt
        return used

    def _prefill_chunk(self, i: int, slot: _Slot, n: int) -> None:
        c = self.config.prefill_chunk
        w = self._window(slot.fed + c)
        tokens = np.zeros((1, c), np.int32)
        tokens[0, :n] = slot.req.ids[slot.fed:slot.fed + n]
        self._run_later(i, tokens, slot.fed, n, w)
        slot.fed += n
        self.host.lengths[i] = slot.fed

    def _start_decoding(self, src: int, req: Request) -> None:
        """The prompt is in slot `src`: copy it to the request's other samples, start them all."""
        for i, slot in enumerate(self.slots):
            if slot is None or slot.req is not req:
                continue
            if i != src:
                self._run_copy(src, i)
            slot.decoding = True
            h = self.host
            h.lengths[i], h.last[i], h.active[i] = len(req.ids) - 1, req.ids[-1], True
            h.budget[i], h.count[i] = req.params.max_new_tokens, 0

    def _decode(self) -> None:
        h, steps = self.host, self.config.decode_steps
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        w = self._window(min(int(h.lengths[occupied].max()) + steps, self.cache_len))
        want_lp = any(s is not None and s.decoding and s.req.params.logprobs for s in self.slots)
        slots, out = jax.device_get(self._run_decode(w, want_lp))
        was_active = h.active.copy()
        self.host = SlotArrays(*(np.array(a) for a in slots))
        self.slot_steps += self.config.slots * steps
        self._hand_out(out, was_active)

    def _hand_out(self, out: programs.Emitted, was_active: np.ndarray) -> None:
        """Give each sample its new tokens; end the samples that stopped."""
        for i in np.flatnonzero(was_active):
            slot = self.slots[i]
            req, valid = slot.req, out.valid[:, i]
            new = out.tokens[valid, i].tolist()
            req.tokens[slot.sample] += new
            if out.logprob is not None:
                req.logprobs[slot.sample] += list(zip(out.logprob[valid, i],
                                                      out.top_ids[valid, i],
                                                      out.top_logprobs[valid, i], strict=True))
            self.tokens_delivered += len(new)
            if req.on_delta is not None and new:
                req.on_delta(req, slot.sample, new)
            if not self.host.active[i] or self._hit_stop(req, slot.sample, len(new)):
                self._end_sample(i)

    def _hit_stop(self, req: Request, sample: int, new: int) -> bool:
        """Whether a stop string ends in the text of this visit's `new` tokens. Only the tail is
        decoded (the new tokens and enough before them for the longest stop string), so a long
        sample costs the same per visit as a short one."""
        stops = req.params.stop
        if not stops or self.tokenizer is None or not new:
            return False
        # a character is at most 4 byte-level tokens
        tail = new + 4 * max(len(s) for s in stops) + 4
        text = self.tokenizer.decode(req.tokens[sample][-tail:])
        return any(s in text for s in stops)

    def _end_sample(self, i: int) -> None:
        slot = self.slots[i]
        self.slots[i] = None
        self.host.active[i] = False
        self.host.lengths[i] = 0
        req = slot.req
        req.ended[slot.sample] = True
        if not any(s is not None and s.req is req for s in self.slots):
            self._finish(req)

    def _finish(self, req: Request) -> None:
        if req.done:
            return
        k = req.params.logprobs
        req.completions = [completion_of(0, j, req.tokens[j], req.logprobs[j] if k else None,
                                         k, set(self.eos_ids), req.params.stop, self.tokenizer,
                                         cancelled=req.cancelled)
                           for j in range(req.params.n)]
        req._done.set()
        if req.on_done is not None:
            req.on_done(req)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            reqs = [*self._incoming, *self._waiting]
            self._incoming.clear()
            self._waiting.clear()
        reqs += list({id(s.req): s.req for s in self.slots if s is not None}.values())
        self._init_slots()
        for req in reqs:
            if not req.done:
                req.error = error
                req._done.set()
                if req.on_done is not None:
                    req.on_done(req)

    # -- the programs, each run with the arguments staged one way (warmup and requests alike, so
    # what warmup compiled is what a request runs)

    def _run_first(self, slot_p: np.ndarray, tokens_pc: np.ndarray, n_p: np.ndarray) -> None:
        self.programs.add(("prefill_first", *tokens_pc.shape))
        self.cache = programs.prefill_first(self.graphdef, self.weights, self.cache,
                                            jnp.asarray(slot_p), jnp.asarray(tokens_pc),
                                            jnp.asarray(n_p), layout=self.layout)

    def _run_later(self, i: int, tokens_1c: np.ndarray, start: int, n: int, w: int) -> None:
        self.programs.add(("prefill", tokens_1c.shape[1], w))
        self.cache = programs.prefill(self.graphdef, self.weights, self.cache, jnp.int32(i),
                                      jnp.asarray(tokens_1c), jnp.int32(start), jnp.int32(n),
                                      layout=self.layout, w=w)

    def _run_copy(self, src: int, dst: int) -> None:
        self.programs.add(("copy_slot",))
        self.cache = programs.copy_slot(self.cache, jnp.int32(src), jnp.int32(dst),
                                        layout=self.layout)

    def _run_decode(self, w: int, logprobs: bool):
        """One decode chunk over every slot: the slots' new state and what they emitted."""
        self.programs.add(("decode", w, logprobs))
        self.cache, slots, out = programs.decode(
            self.graphdef, self.weights, self.cache, SlotArrays(*map(jnp.asarray, self.host)),
            self._eos, layout=self.layout, w=w, steps=self.config.decode_steps, logprobs=logprobs)
        return slots, out

    # -- slots, windows, memory

    def _init_slots(self) -> None:
        s = self.config.slots
        self.slots: list[_Slot | None] = [None] * s
        z = partial(np.zeros, s)
        self.host = SlotArrays(z(np.int32), z(np.int32), z(bool), z(np.int32), z(np.int32),
                               z(np.float32), z(np.int32), np.ones(s, np.float32),
                               np.zeros((s, 2), np.uint32))

    def _set_params(self, i: int, req: Request, sample: int) -> None:
        p, h = req.params, self.host
        h.temperature[i], h.top_k[i], h.top_p[i] = p.temperature, p.top_k, p.top_p
        h.key[i] = np.asarray(request_key(p.seed, sample))
        h.active[i], h.lengths[i] = False, 0

    def _place(self, cache):
        """On a mesh (the weights' sharding names one), the slots split over its data axis, the
        rest of the cache replicated, as the decode of a batch is; otherwise as it is."""
        sharding = getattr(jax.tree.leaves(self.weights)[0], "sharding", None)
        if not isinstance(sharding, NamedSharding):
            # committed as every program's output is: warmup's first program would be compiled
            # for an uncommitted cache, and compiled again when a request first runs it
            return jax.device_put(cache, jax.tree.map(lambda a: a.sharding, cache))
        mesh = sharding.mesh
        data = mesh.shape.get("data", 1)

        def spec(c):
            return PartitionSpec(*("data" if a == self.layout.batch_axis and data > 1
                                   and c.shape[a] % data == 0 else None for a in range(c.ndim)))

        return jax.tree.map(lambda c: jax.device_put(c, NamedSharding(mesh, spec(c))), cache)

    def _window(self, need: int) -> int:
        return next(w for w in self.windows if w >= need)

    def _check_memory(self) -> None:
        shapes = jax.eval_shape(lambda: self.model.init_cache(self.config.slots, self.cache_len))
        need = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))
        free = _free_memory()
        if free is not None and need > 0.9 * free:
            raise EngineError(
                f"{self.config.slots} slots x {self.cache_len} tokens need "
                f"{need / 2**30:.1f} GiB of KV cache and {free / 2**30:.1f} GiB is free: "
                f"lower slots or max_len")

    # -- weights and compilation

    def set_weights(self, weights) -> None:
        """Replace the model's parameters (an `nnx.State` of the same shapes and shardings, or a
        model of the same architecture) without recompiling any program."""
        if isinstance(weights, nnx.Module):
            weights = nnx.state(weights)
        weights = jax.device_put(weights, self._shardings)  # no copy where already there
        self.weights = _unstack(self._paths, weights) if self.unroll else weights

    def warmup(self, logprobs: bool = True) -> int:
        """Compile every program the engine can run (call it idle). Returns their number."""
        if any(self.slots) or self._waiting or self._incoming:
            raise EngineError("warmup() needs an idle engine")
        np.asarray(request_key(0, 0))
        for p in self.row_buckets:
            for c in self.chunks:
                self._run_first(np.zeros(p, np.int32), np.zeros((p, c), np.int32),
                                np.zeros(p, np.int32))
        c = self.config.prefill_chunk
        for w in self.windows:
            if w >= 2 * c:  # a later chunk starts at c or beyond
                self._run_later(0, np.zeros((1, c), np.int32), 0, 0, w)
        for w in self.windows:
            for lp in (False, True) if logprobs else (False,):
                self._run_decode(w, lp)  # every slot idle: nothing changes
        if self.config.slots > 1:
            self._run_copy(0, 1)
        jax.block_until_ready(self.cache)
        return len(self.programs)


def _free_memory() -> int | None:
    """Bytes free on the first device (accelerators), or available host memory (CPU)."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the config's, plus the tokenizer's EOS."""
    ids = list(model.config.eos_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
