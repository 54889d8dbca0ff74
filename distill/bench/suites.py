"""`distill bench --suite NAME`: the benchmarks in suites that run one at a time, each printing a
progress line as it starts, its table as soon as it is done, and its rows to
`<out>/<suite>.json`. "all" runs every suite in turn (more than 25 minutes on a 2-core
machine); "device" is the accelerator suite (`distill.bench.device`, small shapes on CPU);
"engine" the inference engine's targets (`distill.bench.engine`); "onpolicy" the cost of an
on-policy distillation step (`distill.bench.onpolicy`); "lora" a LoRA / QLoRA student's step and
learning beside a full fine-tune's (`distill.bench.lora`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distill.bench import smollm2_path
from distill.errors import DistillError


@dataclass(frozen=True)
class Suite:
    what: str
    run: Callable[[dict], tuple[object, str]]  # settings -> (rows for the JSON, table)


def _decode(s):
    from distill.bench.decode import bench_decode, decode_table

    rows = bench_decode(smollm2_path(s["gguf"]))
    return rows, "\n".join(decode_table(rows))


def _moe(s):
    from distill.bench.decode import bench_moe_experts, moe_table

    rows = bench_moe_experts()
    return rows, "\n".join(moe_table(rows))


def _generate(s):
    from distill.bench.decode import bench_generate, generate_table

    rows = bench_generate(smollm2_path(s["gguf"]))
    return rows, "\n".join(generate_table(rows))


def _train(s):
    from distill.bench.train import bench_train, bench_train_gpu_preset, train_table

    rows = bench_train(batch=4) + bench_train_gpu_preset()
    return rows, "\n".join(train_table(rows))


def _data(s):
    from distill.bench.data import main

    out = s["out"] / "data"
    table = main(str(smollm2_path(s["gguf"])), s["tokens"], out, s["steps"])
    return json.loads((out / "data.json").read_text()), table


def _device(s):
    from distill.bench.device import main, table

    result = main(s["out"] / "device.json", s["small"], s["echo"])
    return result, table(result)


def _engine(s):
    from distill.bench.engine import main, table

    result = main(s.get("model") or smollm2_path(s["gguf"]), s["out"] / "engine.json",
                  progress=s["echo"])
    return result, table(result)


def _onpolicy(s):
    from distill.bench.onpolicy import bench_onpolicy, table

    result = bench_onpolicy(s.get("model") or smollm2_path(s["gguf"]))
    return result, table(result)


def _lora(s):
    from distill.bench.lora import bench_lora_learning, bench_lora_step, table

    try:  # real weights when there are some; else the step on SmolLM2's shape alone
        path = s.get("model") or smollm2_path(s["gguf"])
    except DistillError:
        path = None
    result = {"step": bench_lora_step(path)}
    if path is not None:
        result["learning"] = bench_lora_learning(path)
    return result, table(result)


SUITES: dict[str, Suite] = {
    "decode": Suite("greedy decode tokens/s of SmolLM2-135M at batch 1 and 16 vs transformers",
                    _decode),
    "moe": Suite("the MoE layer's time per token with 8 vs 64 routed experts", _moe),
    "generate": Suite("trace-generation throughput, in process and over HTTP", _generate),
    "train": Suite("the training step vs transformers eager and torch.compile, MFU", _train),
    "data": Suite("the training-data pipeline at R1 scale (tokenized cache, packing)", _data),
    "device": Suite("the accelerator path: kernel parity, train MFU, decode vs bandwidth",
                    _device),
    "engine": Suite("the inference engine's targets: utilisation vs static batching, sampled "
                    "vs greedy step, time to first token, compiles, set_weights", _engine),
    "onpolicy": Suite("an on-policy distillation step beside an SFT step on the same student, "
                      "with its sampling and scoring shares", _onpolicy),
    "lora": Suite("LoRA and QLoRA steps beside the full fine-tune's (time, FLOPs, memory) on "
                  "SmolLM2-135M, and what LoRA learns in the same steps", _lora),
}
ALL = tuple(SUITES)  # "all"


def run_suites(names, settings: dict, echo: Callable[[str], None]) -> dict[str, Path]:
    """Run the named suites (in the order given; "all" expands to `ALL`), echoing progress
    and each table as it finishes. Returns each suite's JSON path."""
    order = list(dict.fromkeys(n for name in names for n in (ALL if name == "all" else (name,))))
    out: Path = settings["out"]
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate(order, 1):
        suite = SUITES[name]
        echo(f"[{i}/{len(order)}] {name}: {suite.what} ...")
        t = time.perf_counter()
        rows, table = suite.run({**settings, "echo": echo})
        path = out / f"{name}.json"
        if name not in ("device", "engine"):  # these write their own file as they go
            path.write_text(json.dumps(rows, indent=2) + "\n")
        written[name] = path
        echo(f"{table}\n\n[{i}/{len(order)}] {name}: done in {time.perf_counter() - t:.0f} s "
             f"-> {path}\n")
    return written
