"""Real weights through the trainer: SmolLM2-135M-Instruct fine-tuned on synthetic traces, exported,
and reloaded by transformers with the same logits and the chat format distill trained on."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml

import distill
from distill.data.prompts import PromptsConfig
from distill.data.render import render_example
from distill.traces.reference import write_reference_traces
from distill.train.loop import run_train
from tests.helpers import invoke_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    traces = write_reference_traces(
        PromptsConfig(source="synthetic", synthetic={"n": 48, "seed": 5}), root / "traces")
    cfg = {"name": "smol", "student": {"init": str(smollm2_gguf)},
           "data": {"traces": [str(traces)], "seq_len": 256, "batch_size": 4},
           "optim": {"lr": 5e-5, "warmup_steps": 0, "schedule": "constant"},
           "train": {"steps": 6, "log_every": 1, "checkpoint_every": 6,
                     "async_checkpoints": False},
           "mesh": "data=1,fsdp=1,tensor=1", "output_root": str(root / "students")}
    (root / "smol.yaml").write_text(yaml.safe_dump(cfg))
    # the same batch every step would prove little; 48 traces in rows of 256 give ~6 batches
    result = run_train(root / "smol.yaml", progress=False, devices=jax.devices()[:1])
    return root, result


def test_fine_tuning_lowers_the_loss(trained):
    _, result = trained
    losses = result.losses
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses


def test_export_reloads_in_transformers_with_the_trained_chat_format(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, result = trained
    out = root / "hf"
    proc = invoke_cli(["export", result.run_dir, "--out", out, "--dtype", "float32"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    ours, tok = distill.load_pretrained(result.run_dir)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "reference solutions" in card and "Final logged training loss" in card
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_p"], gen["do_sample"]) == (0.6, 0.95, True)

    messages = [{"role": "user", "content": "Mia has 7 marbles. She gets 3 more. How many?"}]
    ids, mask = render_example(tok, messages, "7 + 3 = 10", "The answer is \\boxed{10}.")
    # what transformers renders as the prompt is exactly the prompt distill trained on
    hf_prompt = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    first = int(np.argmax(np.asarray(mask)))
    assert list(ids[:first]) == list(hf_prompt)
    with torch.no_grad():
        theirs = ref(torch.tensor([list(ids)])).logits.numpy()
    import jax.numpy as jnp

    # 30 float32 layers: the pretrained weights already differ by ~1.2e-4 (tests/test_smollm2.py)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray([list(ids)], jnp.int32))), theirs,
                               atol=5e-4, rtol=0)
    # greedy decoding: 32 tokens equal (past an end-of-sequence token too)
    from distill.inference import Engine, EngineConfig
    from distill.sampling import SamplingParams

    prompt = list(ids[:first])
    engine = Engine(ours, config=EngineConfig(slots=1, max_len=len(prompt) + 32), eos_ids=[])
    [mine] = engine.generate([prompt], SamplingParams(max_new_tokens=32))
    ref.generation_config.eos_token_id = None  # no stop: all 32 tokens compared
    with torch.no_grad():
        out_ids = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                               pad_token_id=tok.eos_token_id)
    assert mine.token_ids == out_ids[0, len(prompt):].tolist()
