"""Tiny random transformers models built in the tests (no download) and comparison helpers."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

import distill


def tiny_hf(family: str, *, tied=False, heads=4, kv_heads=2, hidden=64, rope_scaling=None,
            layers=2, vocab=160, seed=0):
    """A random float32 transformers Qwen2/Llama causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              tie_word_embeddings=tied, max_position_embeddings=512, bos_token_id=1,
              eos_token_id=2)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, rms_norm_eps=1e-6))
    else:
        if rope_scaling:
            kw["rope_scaling"] = rope_scaling
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_theta=500000.0, rms_norm_eps=1e-5))
    model = model.float().eval()
    with torch.no_grad():  # random biases and norm weights, so a missed tensor shows up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids, jnp.int32)))


def hf_greedy(ref, prompt: list[int], n: int, eos=None) -> list[int]:
    """transformers' greedy continuation of one prompt: `n` new ids (fewer at `eos`)."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                           max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


def staggered(engine, prompts, budgets, first=2):
    """Greedy completions from an inference engine with requests arriving at different times:
    submit `first` requests, run two host visits, then submit the rest; run to the end."""
    from distill.sampling import SamplingParams

    reqs = [engine.submit(p, SamplingParams(max_new_tokens=b))
            for p, b in zip(prompts[:first], budgets[:first], strict=True)]
    engine.step()
    engine.step()
    reqs += [engine.submit(p, SamplingParams(max_new_tokens=b))
             for p, b in zip(prompts[first:], budgets[first:], strict=True)]
    engine.run_until_idle()
    return [r.wait()[0] for r in reqs]


def load(path):
    model, _ = distill.load_pretrained(path)
    return model


DISTILL = [sys.executable, "-m", "distill.cli"]  # `distill` in a fresh interpreter


def environment(env=None) -> dict[str, str]:
    """This process's environment with `env` applied (a value None: the variable removed)."""
    return {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}


@functools.cache
def shared_compile_cache() -> dict[str, str]:
    """The environment that gives the toy runs' processes one JAX compilation cache for the test
    session (a fresh directory, removed at exit): what one `distill train` or `generate` process
    compiled, the next loads instead of compiling it again. Every program is kept, however fast
    it compiled."""
    path = tempfile.mkdtemp(prefix="distill-test-jax-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return {"DISTILL_CACHE": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def start_cli(args, *, cwd=None, env=None, script=False) -> subprocess.Popen:
    """`distill ARGS` started in a fresh interpreter, as a user starts it (stdout and stderr piped,
    text); env: see environment(); script: through the console script `make setup` installed
    rather than `python -m distill.cli`."""
    argv = [str(Path(sys.executable).with_name("distill"))] if script else DISTILL
    return subprocess.Popen([*argv, *map(str, args)], cwd=cwd, env=environment(env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cli(args, *, cwd=None, env=None, timeout: float | None = 300,
            script=False) -> subprocess.CompletedProcess:
    """`distill ARGS` in a fresh interpreter, run to its end (see start_cli): for what only a
    real process shows (exit by signal, several processes, fatal logging, a cold environment)."""
    with start_cli(args, cwd=cwd, env=env, script=script) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def invoke_cli(args, *, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`distill ARGS` in this process through the console entry point `distill.cli.main` (the
    same error handling a user sees: one line on stderr, exit 2), with click's CliRunner
    capturing stdout and stderr apart at the file descriptors; warnings are shown on stderr as a
    plain interpreter shows them; the working directory and environment are restored after."""
    import contextlib
    import warnings

    import jax  # noqa: F401  (imported first: JAX reads the settings the command sets on import)
    from click.testing import CliRunner

    argv = [str(a) for a in args]
    saved_env, saved_argv = dict(os.environ), sys.argv
    try:
        with contextlib.chdir(cwd or os.getcwd()), warnings.catch_warnings(record=True) as shown:
            warnings.resetwarnings()  # then the interpreter's default filters
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                             ResourceWarning):
                warnings.simplefilter("ignore", category)
            result = CliRunner(capture="fd").invoke(_ConsoleEntryPoint("distill"), argv, env=env,
                                                    catch_exceptions=False)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    stderr = result.stderr + "".join(warnings.formatwarning(w.message, w.category, w.filename,
                                                            w.lineno, w.line) for w in shown)
    return subprocess.CompletedProcess(["distill", *argv], result.exit_code, result.stdout, stderr)


class _ConsoleEntryPoint(click.Command):
    """`distill.cli.main` (what the `distill` script runs) as a command CliRunner can invoke: it
    reads its arguments from sys.argv, as the script does."""

    def main(self, args=None, **_):
        from distill import cli

        sys.argv = ["distill", *(args or ())]
        cli.main()


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error as the command line reports it: exit code 2 and one line on stderr (no
    traceback) holding every needle; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and proc.stderr.endswith("\n"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
