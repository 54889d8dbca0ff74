"""`distill demo`: what exists of the pipeline, for real, at toy scale on CPU.

Today that is the model layer on real weights: load SmolLM2-135M-Instruct from its GGUF file,
sample from it with the chat template, export it to Hugging Face format, and reload the export
(with distill, and with transformers when it is installed) to check the logits survived.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from distill.errors import DistillError

DEFAULT_GGUF = Path(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "What is 17 * 23? Think step by step."
# built as commands, not yet part of this demo (see README.md)
NOT_BUILT = ("generate (teacher traces)", "train (SFT / logit distillation)", "eval")


def smollm2_path(gguf_path: str | None) -> Path:
    """The SmolLM2 GGUF to use: the given path, else the one `make models` fetched."""
    gguf = Path(gguf_path) if gguf_path else DEFAULT_GGUF
    if not gguf.is_file():
        raise DistillError(f"{gguf}: SmolLM2 GGUF not found; run `make models` first")
    return gguf


def run_demo(gguf_path: str | None, out_dir: str) -> None:
    """Load, sample, export and reload SmolLM2; print a summary table."""
    import distill
    from distill.models.hf import param_count
    from distill.sampling import SamplingParams, generate
    from distill.textgen import prompt_ids, stop_ids

    console = Console()
    gguf = smollm2_path(gguf_path)
    rows = []

    t = time.perf_counter()
    with console.status("loading SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)"):
        model, tok = distill.load_pretrained(gguf)
    rows.append(("load GGUF", f"{param_count(model.config):,} parameters", time.perf_counter() - t))

    t = time.perf_counter()
    ids = prompt_ids(tok, PROMPT)
    with console.status("sampling 64 tokens greedily (compiled prefill + decode loop)"):
        [out] = generate(model, [ids], SamplingParams(max_new_tokens=64), stop_ids(model, tok), tok)
    rows.append(("sample", f"{len(out.token_ids)} tokens, finish={out.finish_reason}",
                 time.perf_counter() - t))
    console.print(f"[bold]user:[/] {PROMPT}\n[bold]SmolLM2:[/] {out.text.strip()}\n")

    t = time.perf_counter()
    with console.status(f"exporting to {out_dir} (Hugging Face, bfloat16)"):
        export = distill.save_pretrained(model, tok, out_dir, dtype="bfloat16", overwrite=True)
    rows.append(("export", str(export), time.perf_counter() - t))

    t = time.perf_counter()
    probe = np.asarray([ids], np.int32)
    reloaded, _ = distill.load_pretrained(export)
    diff = float(np.abs(np.asarray(reloaded(probe)) - np.asarray(model(probe))).max())
    rows.append(("reload (distill)", f"max |logit diff| {diff:.3g} (bfloat16 rounding)",
                 time.perf_counter() - t))
    rows.append(_reload_transformers(export, probe, np.asarray(reloaded(probe))))

    table = Table(title="distill demo (SmolLM2-135M-Instruct, CPU)")
    for col in ("stage", "result", "seconds"):
        table.add_column(col)
    for stage, result, seconds in rows:
        table.add_row(stage, result, "-" if seconds is None else f"{seconds:.1f}")
    for stage in NOT_BUILT:
        table.add_row(stage, "[yellow]not in the demo yet[/]", "-")
    console.print(table)


def _reload_transformers(export: Path, probe: np.ndarray, ours: np.ndarray):
    t = time.perf_counter()
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return ("reload (transformers)", "transformers not installed: skipped", None)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(probe)).logits.numpy()
    diff = float(np.abs(theirs - ours).max())
    return ("reload (transformers)", f"max |logit diff| vs distill {diff:.2g}", time.perf_counter() - t)
