"""`load_pretrained` / `save_pretrained`: every kind of model path, one entry point.

A MODEL path is a Hugging Face model directory (config.json + safetensors), a GGUF file, a
students/<run> training directory (`distill.runs`), or a model preset YAML (random initialisation,
for tests and planning).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from distill.errors import DistillError
from distill.fsutil import new_directory
from distill.models import gguf, lora, safetensors_io, weights
from distill.models.deepseek import hf as deepseek_hf
from distill.models.deepseek.config import MoEConfig
from distill.models.families import load_model_config, model_class
from distill.models.llama import hf as llama_hf
from distill.models.llama.config import DenseConfig
from distill.parallel import shard_module, state_shardings
from distill.runs import (
    base_fingerprint,
    is_run,
    load_run,
    lora_base,
    read_config,
    read_model_config,
)
from distill.tokenizer import Tokenizer


def model_kind(path: str | Path) -> str:
    """'hf', 'gguf', 'preset' or 'run' (a students/<run> directory) for a MODEL path; a DistillError
    for anything else."""
    p = Path(path)
    if not p.exists():
        raise DistillError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        if is_run(p):
            return "run"
        raise DistillError(f"{p}: not a model directory (no config.json, and not a "
                           "students/<run> directory with model.json and checkpoints/)")
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix in (".yaml", ".yml"):
        return "preset"
    raise DistillError(f"{p}: unknown kind of model file (expected a HF directory, .gguf or .yaml)")


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}: invalid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a JSON object")
    return data


def init_model(cfg: DenseConfig | MoEConfig, seed: int = 0, mesh: Mesh | None = None) -> nnx.Module:
    """A randomly initialised model, created directly in its sharded layout when `mesh` is given."""
    model_cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(seed)))
    # one compiled initialiser: far quicker than dispatching every parameter's init eagerly
    shardings = None if mesh is None else state_shardings(nnx.state(abstract), mesh)

    state = jax.jit(lambda: nnx.state(model_cls(cfg, nnx.Rngs(seed))), out_shardings=shardings)()
    return nnx.merge(nnx.graphdef(abstract), state)


def load_pretrained(path: str | Path, *, param_dtype: str = "float32", dtype: str | None = None,
                    mesh: Mesh | None = None, overrides=(), seed: int = 0, merge: bool = False):
    """Load (model, tokenizer) from a MODEL path.

    param_dtype: storage dtype of the weights ("float32" or "bfloat16"); dtype: compute dtype
    (default: param_dtype). With a `mesh`, every weight is placed sharded as its logical axis
    names say while it streams in. The tokenizer is None when the path carries none.
    A LoRA run loads its base (the run's student.init) and its adapters: as trained (quantised
    base and all), or with `merge` folded into the unquantised base (a plain model). A LoRA run
    whose base is itself a LoRA run stands on that run's merged model (as `distill train` does).
    """
    path = Path(path)
    kind = model_kind(path)
    runtime = {"param_dtype": param_dtype, "dtype": dtype or param_dtype}
    if overrides and kind != "preset":
        raise DistillError(f"{path}: --set overrides apply to preset YAML models only")
    if kind == "preset":
        cfg = load_model_config(path, [*overrides, *(f"model.{k}={v}" for k, v in runtime.items())])
        return init_model(cfg, seed, mesh), None
    if kind == "run":
        base = lora_base(path)
        if base is not None:
            return _load_lora_run(path, base, mesh, merge, runtime)
        return load_run(path, mesh=mesh, **runtime)
    if kind == "gguf":
        cfg = llama_hf.config_from_hf(gguf.read_gguf_config(path), str(path), **runtime)
        model = llama_hf.build_from_tensors(cfg, gguf.iter_gguf_tensors(path), str(path), mesh)
        return model, Tokenizer.from_gguf(path)
    config_json = read_hf_config(path)
    if deepseek_hf.is_moe(config_json):
        cfg = deepseek_hf.config_from_hf(config_json, str(path / "config.json"), **runtime)
        block = deepseek_hf.quantization_block(config_json, str(path / "config.json"))
        model = deepseek_hf.build_from_tensors(cfg, safetensors_io.iter_checkpoint(path), str(path),
                                          mesh, block)
    else:
        cfg = llama_hf.config_from_hf(config_json, str(path / "config.json"), **runtime)
        model = llama_hf.build_from_tensors(cfg, safetensors_io.iter_checkpoint(path), str(path), mesh)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return model, Tokenizer.from_pretrained(path) if has_tokenizer else None


def _load_lora_run(run_dir: Path, base_path: str, mesh, merge: bool, runtime: dict):
    """A LoRA run: its base loaded, the run's adapters (and quantisation unless `merge`)
    declared on it and restored from the run's checkpoint."""
    cfg = read_model_config(run_dir, **runtime)
    seed = (read_config(run_dir).get("train") or {}).get("seed", 0)  # a preset base's init
    model, _ = load_pretrained(base_path, mesh=mesh, merge=True, seed=seed, **runtime)
    fingerprint = base_fingerprint(model)
    model.config = cfg.model_copy(update={"lora": None, "quantize": "none"})
    lora.adapt(model, cfg.lora, "none" if merge else cfg.quantize, jax.random.key(0))
    if mesh is not None:  # the adapters and the quantised weights, where their names say
        shard_module(model, mesh)
    model, tokenizer = load_run(run_dir, mesh=mesh, base=model, fingerprint=fingerprint,
                                **runtime)
    return (lora.merge(model) if merge else model), tokenizer


def hf_config(cfg: DenseConfig | MoEConfig, dtype: str | None = None) -> dict:
    """The config.json of a model as `save_pretrained` writes it."""
    if isinstance(cfg, MoEConfig):  # no multi-token-prediction weights are carried
        return {**deepseek_hf.config_to_hf(cfg, dtype), "num_nextn_predict_layers": 0}
    return llama_hf.config_to_hf(cfg, dtype)


def save_pretrained(model, tokenizer, out_dir: str | Path, *, dtype: str = "float32",
                    max_shard_bytes: int = 5 * 10**9, overwrite: bool = False,
                    generation_config: dict | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a Hugging Face model directory (config.json, safetensors, tokenizer files, and
    `extra_files` such as a model card) of a dense student (LlamaForCausalLM / Qwen2ForCausalLM)
    or a DeepSeek-V3 MoE (DeepseekV3ForCausalLM).

    Everything is written into a temporary sibling directory that is renamed into place at the
    end, so an interrupted save never leaves a directory that looks complete, and a failed write
    (a full disk) leaves `out_dir` as it was, with one line that says so.
    """
    out = Path(out_dir)
    with new_directory(out, overwrite) as tmp:
        cfg = model.config
        config = hf_config(cfg, dtype)
        # a DeepseekV3 model's experts are written one tensor each, as DeepSeek publishes them
        table = deepseek_hf.weight_table(cfg) if isinstance(cfg, MoEConfig) else llama_hf.TABLE
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": config["eos_token_id"]}
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        weights.save_weights(model, tmp, table, dtype, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out
