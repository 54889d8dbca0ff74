"""Multi-host runs: `jax.distributed` initialisation, and a lost process as one line.

When one process of a run dies (killed, its host gone), the others must not hang in a collective
or a barrier, nor end in JAX's fatal logs. Two things end them, whichever comes first, each with
one line and exit code 2:
- a watchdog thread (`Watchdog`): every process bumps a counter of its own in the coordination
  service's key-value store every `timeout_s / 10` seconds; a peer whose counter has not moved for
  `timeout_s`, or a store that does not answer (process 0, which hosts it, is gone), is a lost
  process. JAX's own heartbeat timeout is set to three times as long, so this comes first;
- a collective that fails because its peer's connection closed (gloo on CPU): the stage that runs
  the step calls `lost_process` with the error.
What is safe (the last checkpoint) is said by the function the running stage registers with
`on_lost`. The exit skips interpreter shutdown: `jax.distributed.shutdown` would wait for the
lost process at a barrier.

When process 0 itself is lost, JAX's client in every other process learns it at once from the
service's closed connection and aborts the process with a fatal log (its callback for that case
cannot be replaced from Python in this jaxlib). `supervise` runs such a process as a child and
turns that ending into the same one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import jax

LOST_AFTER_S = 60  # a peer unheard of this long is lost (JAX's own heartbeat: 3x this)
_ALIVE, _DONE = "distill/alive/", "distill/done/"

_safe: list[Callable[[], str]] = []  # what a lost process leaves safe, in words


def initialize(address: str, num_processes: int | None, process_id: int | None, *,
               lost_after_s: int = LOST_AFTER_S) -> None:
    """jax.distributed.initialize, with JAX's heartbeat timeout behind the watchdog's."""
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPU/TPU ignore it
    jax.distributed.initialize(address, num_processes, process_id,
                               heartbeat_timeout_seconds=3 * lost_after_s,
                               shutdown_timeout_seconds=3 * lost_after_s)


class Watchdog:
    """While open (on every process of a multi-process run; a no-op with one process), ends this
    process with `lost_process` when another is lost (see the module docstring). Leaving the
    block normally marks this process done, so that peers still finishing do not miss it."""

    def __init__(self, lost_after_s: float = LOST_AFTER_S):
        self.lost_after_s = lost_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Watchdog:
        if jax.process_count() > 1:
            from jax._src.distributed import global_state  # JAX's client: no public handle

            self.client, self.me = global_state.client, jax.process_index()
            self._thread = threading.Thread(target=self._watch, name="distill-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, *_) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if kind is None:
            self.client.key_value_set(f"{_DONE}{self.me}", "1", allow_overwrite=True)

    def settle(self) -> None:
        """After a runtime error that may be a peer's death seen from afar ("Error dispatching
        computation" after a failed collective): give the watchdog the time it needs to tell,
        so that a lost peer ends this process in one line; return when none is lost."""
        if self._thread is not None:
            time.sleep(1.5 * self.lost_after_s)

    def _watch(self) -> None:
        beats, seen = 0, {}  # peer -> (its counter, when it last moved)
        while not self._stop.wait(self.lost_after_s / 10):
            beats += 1
            try:
                self.client.key_value_set(f"{_ALIVE}{self.me}", str(beats), allow_overwrite=True)
                alive = _entries(self.client.key_value_dir_get(_ALIVE))
                done = _entries(self.client.key_value_dir_get(_DONE))
            except Exception as e:  # noqa: BLE001 - the store is process 0's: it is gone
                lost_process(f"the coordination service does not answer: {e}")
            now = time.monotonic()
            for peer, value in alive.items():
                if peer == self.me or peer in done:
                    continue
                if seen.get(peer, (None,))[0] != value:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self.lost_after_s:
                    lost_process(f"process {peer} has not been heard from for "
                                 f"{self.lost_after_s:.0f} s")


def _entries(pairs) -> dict[int, str]:
    return {int(key.rstrip("/").rsplit("/", 1)[-1]): value for key, value in pairs}


_GLOO = re.compile(r"Gloo (\w+) failed: (?:\[[^\]]*\] )?([^\n]*)")  # [file.cc:N] dropped
_PEER_GONE = ("Connection reset", "Connection closed", "Broken pipe", "Read error",
              "Write error", "Connection refused", "Timed out")


def peer_gone(exc: BaseException) -> str | None:
    """When a runtime error is a collective whose peer's connection closed (a lost process), the
    reason in a few words ("Gloo AllGather failed: Read error ...: Connection reset by peer")."""
    m = _GLOO.search(str(exc))
    if m is None or not any(s in m.group(2) for s in _PEER_GONE):
        return None
    return f"Gloo {m.group(1)} failed: {m.group(2)}"


def on_lost(safe: Callable[[], str]) -> None:
    """Register what a lost process leaves safe (the running stage's checkpoints), in words."""
    _safe[:] = [safe]


def lost_process(why: str) -> NoReturn:
    """One line naming this process and what is safe, then exit 2 at once."""
    safe = _safe[0]() if _safe else "nothing of this run is lost"
    sys.stderr.write(_lost_line(f"process {jax.process_index()} of {jax.process_count()}", why,
                                safe))
    sys.stderr.flush()
    os._exit(2)


def _lost_line(process: str, why: str, safe: str) -> str:
    first = (str(why).strip().splitlines() or ["no reason given"])[0][:300]
    return f"error: {process} lost contact with the run's other processes ({first}); {safe}\n"


# ---------------------------------------------------------------------------------------------
# The supervisor

SUPERVISED = "DISTILL_SUPERVISED"  # set in the child a supervisor runs
# how JAX's client and the coordination service begin their fatal output when a process is lost
_FATAL = ("coordination service", "coordination_service", "Check failure stack trace",
          "Terminating process because", "heartbeat timeout", "Failed to send RPC")


def _die_with_parent() -> None:
    """In the child, before exec: a supervisor killed (kill -9) takes its child with it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def supervised() -> bool:
    return os.environ.get(SUPERVISED) == "1"


def supervise(argv: list[str], safe: Callable[[], str], process: str) -> int:
    """Run `python -m distill.cli ARGV` as a child with its stderr passed through until JAX's
    fatal output about a lost process begins; that ending becomes one line naming `process`
    ("process 1 of 2") and `safe()`, with exit code 2. SIGTERM / SIGINT reach the child as
    SIGTERM (it checkpoints and stops). Returns the exit code to leave with."""
    child = subprocess.Popen([sys.executable, "-m", "distill.cli", *argv],
                             env={**os.environ, SUPERVISED: "1"}, stderr=subprocess.PIPE,
                             preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGINT):  # as SIGTERM: a Ctrl-C reaches the child too,
        signal.signal(sig, lambda _s, _f: child.send_signal(signal.SIGTERM))  # and each is one
    fatal, pending, held = None, b"", []  # held: what follows the fatal line (bounded)
    while chunk := os.read(child.stderr.fileno(), 65536):
        if fatal is not None:
            if sum(map(len, held)) < 2**20:
                held.append(chunk)
            continue
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()  # an unfinished line (a progress bar) waits for its end...
        out = []
        for i, line in enumerate(lines):
            text = line.decode(errors="replace")
            if not text.startswith("error: ") and any(m in text for m in _FATAL):
                fatal = text
                held = [b"\n".join(lines[i:]) + b"\n", pending]
                break
            out.append(line + b"\n")
        if fatal is None and pending and b"\r" in pending:  # ...unless it redraws itself
            out.append(pending)
            pending = b""
        sys.stderr.buffer.write(b"".join(out))
        sys.stderr.flush()
    code = child.wait()
    if fatal is None or code == 0:  # not the end of a lost run after all: show what was held
        sys.stderr.buffer.write(b"".join(held) if fatal is not None else pending)
        sys.stderr.flush()
        return code if code >= 0 else 128 - code
    sys.stderr.write(_lost_line(process, fatal.split("] ", 1)[-1], safe()))
    return 2
