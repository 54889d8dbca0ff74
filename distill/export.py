"""`distill export`: any MODEL (a students/<run> checkpoint above all) to a Hugging Face directory
that transformers, vLLM and SGLang load as they are: config.json, sharded safetensors with an index,
generation_config.json with the R1-Distill sampling defaults, the tokenizer with its chat template,
and a model card naming the teacher, the traces, the training config and the eval results.

A LoRA run exports merged (W + scale * A B on the unquantised base, in float32, cast once), or
with `adapter=True` as a PEFT adapter directory for its base (`distill.models.peft`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

from distill import runs
from distill.errors import DistillError
from distill.models.families import param_count
from distill.models.lora import LoraConfig
from distill.models.peft import VLLM_MAX_LORA_RANKS, hf_module, save_adapter
from distill.pretrained import hf_config, load_pretrained, model_kind, save_pretrained

# DeepSeek-R1's recommendation for its distilled students (model card "Usage Recommendations").
R1_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}


def export(checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16",
           force: bool = False, eval_report: str | Path | None = None,
           on_warning: Callable[[str], None] | None = None, adapter: bool = False) -> Path:
    """Write the HF directory; returns its path. `eval_report`: an eval.json from `distill eval`
    to quote in the model card (default: none). Caveats about how other tools will read the
    export go to `on_warning` (default: `warnings.warn`). A LoRA run is written merged, or with
    `adapter` as a PEFT adapter directory (float32; `dtype` does not apply)."""
    checkpoint = Path(checkpoint)
    kind = model_kind(checkpoint)
    if kind == "preset":
        raise DistillError(f"{checkpoint}: a preset has random weights; export a trained "
                           "students/<run> directory or a model directory")
    lora_run = kind == "run" and run_lora(checkpoint) is not None
    if adapter:
        if not lora_run:
            what = {"run": "a full fine-tune run", "gguf": "a GGUF file, not a run"}.get(
                kind, "a model directory, not a run")
            raise DistillError(f"{checkpoint}: --adapter exports the adapters of a LoRA run "
                               f"(trained with student.lora); this is {what}")
        model, tokenizer = load_pretrained(checkpoint)
        return export_adapter(model, tokenizer, out_dir, base_name=run_base(checkpoint),
                              source=str(checkpoint), force=force, on_warning=on_warning)
    # a LoRA run: its adapters merged into the unquantised base
    model, tokenizer = load_pretrained(checkpoint, merge=True) if lora_run else \
        load_pretrained(checkpoint)
    for caveat in tokenizer_caveats(model.config, tokenizer):
        (on_warning or warnings.warn)(caveat)
    # without a tokenizer (a bare HF checkpoint) the weights are exported alone; the card says so
    card = model_card(checkpoint if kind == "run" else None, str(checkpoint), model, eval_report,
                      tokenizer)
    return save_pretrained(model, tokenizer, out_dir, dtype=dtype, overwrite=force,
                           generation_config=R1_GENERATION, extra_files={"README.md": card.encode()})


def run_lora(run_dir: Path) -> dict | None:
    """The `student.lora` of a run's training config (None: a full fine-tune)."""
    return (runs.read_config(run_dir).get("student") or {}).get("lora")


def run_base(run_dir: Path) -> str:
    """The base model a LoRA run's adapters belong to: its `student.init`."""
    return str((runs.read_config(run_dir).get("student") or {}).get("init"))


def export_adapter(model, tokenizer, out_dir: str | Path, *, base_name: str, source: str,
                   force: bool = False, on_warning: Callable[[str], None] | None = None) -> Path:
    """Write a LoRA model's adapters as a PEFT directory for `base_name`, with the tokenizer's
    files and a README saying how PEFT and vLLM load it."""
    card = adapter_card(model.config.lora, base_name, source, Path(out_dir).name)
    return save_adapter(model, out_dir, base_name, tokenizer=tokenizer, overwrite=force,
                        extra_files={"README.md": card.encode()}, on_warning=on_warning)


def adapter_card(cfg: LoraConfig, base_name: str, source: str, name: str) -> str:
    """The README.md of an exported PEFT adapter."""
    fit = min((r for r in VLLM_MAX_LORA_RANKS if r >= cfg.rank), default=None)
    modules = ", ".join(sorted(hf_module(t) for t in cfg.targets))
    serve = (f"`vllm serve {base_name} --enable-lora --max-lora-rank {fit} --lora-modules "
             f"{name}=<this directory>`" if fit else
             f"not by vLLM: its largest --max-lora-rank is {VLLM_MAX_LORA_RANKS[-1]}")
    return "\n".join([
        "---", "library_name: peft", f"base_model: {base_name}",
        "tags: [distill, lora, distillation]", "---", "", f"# {name}", "",
        f"A LoRA adapter (rank {cfg.rank}, alpha {cfg.alpha:g}"
        f"{', rsLoRA' if cfg.rslora else ''}; on {modules}) for `{base_name}`, exported by "
        f"`distill export --adapter` from `{source}`.", "",
        "Load it with PEFT:", "", "```python", "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
        'model = PeftModel.from_pretrained(base, "<this directory>")', "```", "",
        f"Serve it: {serve}.", "",
        f"The merged model instead: `distill export {source} --out DIR` (no `--adapter`).", ""])


def tokenizer_caveats(cfg, tokenizer) -> list[str]:
    """Ways in which transformers would not read the exported tokenizer as distill does.

    transformers 5 loads the tokenizer of every `qwen2` model as its byte-level Qwen2Tokenizer,
    whatever tokenizer_config.json names (qwen2 is in its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS),
    so a Qwen2 student with any other kind of tokenizer gets other token ids there.
    """
    if tokenizer is None or getattr(cfg, "family", None) != "qwen2":
        return []
    pre = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
    if "ByteLevel" in json.dumps(pre):
        return []
    return ["this qwen2 model's tokenizer is not byte-level BPE, but transformers loads every qwen2 "
            "tokenizer as Qwen2Tokenizer (byte-level): there its special tokens and ids will differ "
            "from distill's. Use a Llama student for such a tokenizer, or Qwen's own tokenizer."]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _training_facts(run_dir: Path) -> tuple[dict, list[str], dict | None]:
    """(resolved training config, trace-set lines, last metrics) of a students/<run>."""
    cfg = runs.read_config(run_dir)
    traces = []
    for path in (cfg.get("data") or {}).get("traces", []):
        manifest = _read_json(Path(path) / "manifest.json") or {}
        teacher = manifest.get("teacher") or {}
        if teacher:
            source = f"teacher `{teacher.get('model')}` ({teacher.get('kind')})"
        elif (manifest.get("config") or {}).get("reference"):
            source = "reference solutions"
        else:
            source = "an unknown source"
        records = (manifest.get("totals") or {}).get("records", "?")
        traces.append(f"`{path}`: {records} traces from {source}")
    last = None
    metrics = run_dir / runs.METRICS
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        losses = [r for r in rows if "loss" in r]
        last = losses[-1] if losses else None
    return cfg, traces, last


def model_card(run_dir: Path | None, source: str, model, eval_report, tokenizer=None) -> str:
    """The README.md of an exported model (a student, or a DeepSeek-V3 teacher)."""
    c = model.config
    lines = ["---", "library_name: transformers", "tags: [distill, reasoning, distillation]", "---",
             "", f"# {Path(source).name}", "",
             f"A {param_count(c) / 1e6:.1f}M-parameter {c.family} model "
             f"({hf_config(c)['architectures'][0]}), exported by `distill export` from "
             f"`{source}`.", "",
             "Its chat template opens the reasoning with `<think>`; sample with the R1-Distill "
             "settings in generation_config.json (temperature 0.6, top-p 0.95)." if tokenizer
             else "Exported without a tokenizer (the source had none).", ""]
    if run_dir is not None:
        cfg, traces, last = _training_facts(run_dir)
        lines += ["## Training", ""]
        lines += [f"- Trace data: {t}" for t in traces] or ["- Trace data: (unknown)"]
        loss = cfg.get("loss", {})
        lines += [f"- Loss: `{json.dumps(loss)}`",
                  f"- Student init: `{(cfg.get('student') or {}).get('init')}`"]
        if last:
            lines.append(f"- Final logged training loss: {last['loss']:.4f} at step {last['step']}")
        lines += ["", "<details><summary>training config</summary>", "", "```yaml",
                  yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "</details>", ""]
    if eval_report is not None:
        report = _read_json(Path(eval_report))
        if report is None:
            raise DistillError(f"{eval_report}: not a readable eval.json")
        md = Path(eval_report).with_name("eval.md")
        lines += ["## Evaluation", ""]
        lines += [md.read_text().strip()] if md.is_file() else [
            "```json", json.dumps(report, indent=2)[:4000], "```"]
        lines.append("")
    return "\n".join(lines) + "\n"
