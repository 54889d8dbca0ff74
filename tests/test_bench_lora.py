"""`distill bench --suite lora` at a tiny shape: the report's structure, and the LoRA step's
compiled FLOPs below the full fine-tune's (the frozen base gets no gradient). No timing asserted."""

from pathlib import Path

import pytest

from distill.bench.lora import VARIANTS, adapter_bytes, bench_lora_step, table
from distill.bench.suites import SUITES
from distill.models.families import load_model_config
from distill.models.lora import LoraConfig

TINY = Path(__file__).resolve().parents[1] / "configs" / "students" / "tiny-qwen2.yaml"


@pytest.fixture(scope="module")
def step():
    return bench_lora_step(preset=TINY, batch=2, seq_len=16, rank=4, repeats=2)


def test_three_steps_timed_with_their_figures(step):
    assert step["model"] == "tiny-qwen2" and step["repeats"] == 2
    assert set(step["variants"]) == set(VARIANTS) == {"full", "lora", "qlora"}
    for name, r in step["variants"].items():
        assert len(r["step_s_all"]) == 2 and r["step_s"] > 0, name
        for key in ("flops", "dots", "memory_bytes", "argument_bytes", "trainable_params"):
            assert r[key] > 0, (name, key)
    assert "vs_full" not in step["variants"]["full"]
    assert all(step["variants"][v]["vs_full"] > 0 for v in ("lora", "qlora"))
    assert step["peak_rss_bytes"] > 0 and "memory_analysis" in step["memory"]


def test_lora_trains_the_adapters_and_computes_less(step):
    full, lo, q = (step["variants"][v] for v in ("full", "lora", "qlora"))
    cfg = load_model_config(TINY)
    n = adapter_bytes(cfg, LoraConfig(rank=4)) // 4
    assert lo["trainable_params"] == q["trainable_params"] == n
    assert full["trainable_params"] > 10 * n
    # no gradient for the frozen weights: the backward pass skips their dW matmuls
    assert lo["flops"] < full["flops"] and q["flops"] < full["flops"]
    assert lo["argument_bytes"] < full["argument_bytes"]  # no optimizer state for the base


def test_table_and_registration(step):
    text = table({"step": step})
    assert all(f"| {v} |" in text for v in VARIANTS) and "skipped" in text
    learning = {"model": "m", "steps": 3, "batch": 2, "seq_len": 16, "rank": 4, "tail": 1,
                "full": {"lr": 1e-4, "first_loss": 3.0, "last_loss": 2.0, "reduction": 1.0,
                         "wall_s": 1.0},
                "lora": {"lr": 1e-3, "first_loss": 3.0, "last_loss": 2.1, "reduction": 0.9,
                         "wall_s": 1.0},
                "reduction_ratio": 0.9, "adapter_file_bytes": 1010,
                "adapter_analytic_bytes": 1000, "adapter_size_ratio": 1.01}
    text = table({"step": step, "learning": learning})
    assert "LoRA / full loss reduction: 90%" in text and "+1.00%" in text
    assert "lora" in SUITES
