"""PEFT's LoRA adapter directory <-> a model's adapters (`distill.models.lora`).

A directory holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors are
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [R, in]   float32
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, R]  float32
in torch's [out, in] order: A [L, *in, R] and B [L, R, *out] go through the weight tables'
linear layouts ("t1" / "t2", `distill.models.weights`), nothing else, so export -> import is
bit-exact. `transformers` + `peft.PeftModel.from_pretrained(base, dir)` and vLLM
(`--enable-lora`) load it on the base model it names.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from distill.errors import DistillError
from distill.fsutil import new_directory
from distill.models import weights
from distill.models.lora import TARGETS, LoraConfig, adapter_attr
from distill.models.safetensors_io import SafetensorsFile

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_MODULE = "base_model.model.model.layers.{i}."  # PeftModel > LlamaForCausalLM > LlamaModel

# vLLM's allowed `--max-lora-rank` values (vllm/config/lora.py, `MaxLoRARanks = Literal[1, 8,
# 16, 32, 64, 128, 256, 320, 512]`); it serves an adapter whose r is at most --max-lora-rank
# (vllm/lora/peft_helper.py, `validate_legal`), so a rank above 512 is refused there.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def hf_module(target: str) -> str:
    """PEFT's name of a target's module ("q" -> "q_proj"): what `target_modules` lists."""
    return TARGETS[target].hf.rsplit(".", 1)[-1]


def adapter_table(cfg: LoraConfig) -> weights.WeightTable:
    """The PEFT <-> native table of the adapters `cfg` declares."""
    rows = []
    for name in cfg.targets:
        t = TARGETS[name]
        native, hf = f"blocks.{t.module}.{adapter_attr(name)}", f"{_MODULE}{t.hf}"
        rows += [(f"{hf}.lora_A.weight", f"{native}.lora_a", f"t{t.n_in}"),
                 (f"{hf}.lora_B.weight", f"{native}.lora_b", "t1")]
    return weights.WeightTable(tuple(rows), optional=())


def adapter_config(cfg: LoraConfig, base_name: str) -> dict:
    """adapter_config.json as PEFT 0.22's `save_pretrained` writes it, the fields that matter
    to PEFT and vLLM (vLLM refuses a bias, modules_to_save, DoRA and LoRA bias)."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": cfg.rank, "lora_alpha": alpha, "use_rslora": cfg.rslora,
        "target_modules": sorted(hf_module(t) for t in cfg.targets),
        "lora_dropout": cfg.dropout, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "use_dora": False, "lora_bias": False,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "layer_replication": None, "revision": None,
    }


def vllm_rank_caveat(rank: int) -> str | None:
    """What vLLM will say of an adapter of this rank (None: nothing)."""
    if rank in VLLM_MAX_LORA_RANKS:
        return None
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        return (f"vLLM serves LoRA adapters of rank up to {VLLM_MAX_LORA_RANKS[-1]}; this one "
                f"has rank {rank}: vLLM will refuse it (PEFT loads it)")
    fit = min(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    return (f"rank {rank} is not one of vLLM's --max-lora-rank values "
            f"{VLLM_MAX_LORA_RANKS}: serve it with --max-lora-rank {fit} or more")


def _lora_config(model: nnx.Module, what: str) -> LoraConfig:
    cfg = getattr(model.config, "lora", None)
    if cfg is None:
        raise DistillError(f"{what}: the model has no LoRA adapters")
    return cfg


def save_adapter(model: nnx.Module, out_dir: str | Path, base_name: str, *, tokenizer=None,
                 extra_files: dict[str, bytes] | None = None, overwrite: bool = False,
                 on_warning: Callable[[str], None] | None = None) -> Path:
    """Write the model's adapters as a PEFT LoRA directory for the base model `base_name` (its
    `base_model_name_or_path`), with the tokenizer's files and `extra_files` (a README) beside
    them. Written into a temporary sibling renamed into place (a full disk: one line, `out_dir`
    as it was). A rank vLLM cannot serve as it is goes to `on_warning` (default warnings.warn)."""
    out = Path(out_dir)
    cfg = _lora_config(model, str(out))
    caveat = vllm_rank_caveat(cfg.rank)
    if caveat:
        (on_warning or warnings.warn)(caveat)
    with new_directory(out, overwrite) as tmp:
        (tmp / CONFIG).write_text(json.dumps(adapter_config(cfg, base_name), indent=2) + "\n")
        weights.save_weights_file(model, tmp / WEIGHTS, adapter_table(cfg), "float32")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a PEFT directory, checked to be a plain LoRA distill can hold."""
    path = adapter_dir / CONFIG
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DistillError(f"{adapter_dir}: not a PEFT adapter directory (no {CONFIG})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise DistillError(f"{path}: not a LoRA adapter (peft_type "
                           f"{data.get('peft_type') if isinstance(data, dict) else None!r})")
    unsupported = [k for k, ok in (
        ("bias", data.get("bias", "none") == "none"), ("use_dora", not data.get("use_dora")),
        ("lora_bias", not data.get("lora_bias")), ("fan_in_fan_out", not data.get("fan_in_fan_out")),
        ("modules_to_save", not data.get("modules_to_save")),
        ("rank_pattern", not data.get("rank_pattern")), ("alpha_pattern", not data.get("alpha_pattern")),
        ("layers_to_transform", data.get("layers_to_transform") is None)) if not ok]
    if unsupported:
        raise DistillError(f"{path}: {unsupported[0]}={data.get(unsupported[0])!r} is not "
                           "supported (distill holds plain LoRA adapters)")
    return data


def _check_matches(data: dict, cfg: LoraConfig, path: Path) -> None:
    """The adapter's rank, alpha, rsLoRA and targets are those of the model's adapters."""
    targets = data.get("target_modules")
    if not isinstance(targets, list):
        raise DistillError(f"{path}: target_modules {targets!r} is not a list of module names")
    ours = sorted(hf_module(t) for t in cfg.targets)
    for key, theirs, mine in (("r", data.get("r"), cfg.rank),
                              ("lora_alpha", data.get("lora_alpha"), cfg.alpha),
                              ("use_rslora", bool(data.get("use_rslora")), cfg.rslora),
                              ("target_modules", sorted(targets), ours)):
        if theirs != mine:
            raise DistillError(f"{path}: {key} is {theirs!r}, the model's adapters have {mine!r}")


def load_adapter(model: nnx.Module, adapter_dir: str | Path) -> nnx.Module:
    """Read a PEFT LoRA directory into a model that has adapters of the same rank, alpha and
    targets (bit-exact: `save_adapter` then `load_adapter` gives the same A and B). Anything
    else (another rank or targets, a missing or unexpected tensor) is a DistillError, one line.
    Returns the model."""
    adapter_dir = Path(adapter_dir)
    data = read_adapter_config(adapter_dir)
    cfg = _lora_config(model, str(adapter_dir))
    _check_matches(data, cfg, adapter_dir / CONFIG)
    path = adapter_dir / WEIGHTS
    if not path.is_file():
        raise DistillError(f"{adapter_dir}: no {WEIGHTS} (a .bin adapter: re-save it with PEFT's "
                           "save_pretrained(safe_serialization=True))")
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    placed = {k: v[...].sharding for k, v in flat.items()}  # keep each adapter where it was
    with SafetensorsFile(path) as f:
        weights.fill_state(flat, ((n, f.get(n)) for n in f.names()), str(path),
                           table=adapter_table(cfg))
    for key, var in flat.items():
        var.set_value(jax.device_put(var[...], placed[key]))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
