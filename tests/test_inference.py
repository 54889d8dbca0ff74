"""The slot engine: greedy equals transformers token for token with requests arriving at different
times (SmolLM2's real weights here; a DeepSeek-V3 MoE's in test_moe.py), seeded requests
independent of their neighbours, zero compiles after warmup, n > 1 from one prefill,
cancellation, stop strings, streaming, set_weights, and one-line errors for what it cannot
serve."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import distill
from distill.chat import prompt_ids
from distill.inference import Engine, EngineConfig, EngineError, compiles
from distill.sampling import SamplingParams
from tests.helpers import hf_greedy, save_hf, staggered, tiny_hf

# One engine shape for the tests on `qwen` (slots, max_len, chunk, window): their programs compile
# once for the module, not once per test
SHAPE = EngineConfig(slots=4, max_len=128, prefill_chunk=64, decode_steps=4, min_window=32)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(transformers model, our model, its directory): a tiny random Qwen2, vocab 160, whose
    greedy continuations vary (the toy checkpoint's repeat one token)."""
    ref = tiny_hf("qwen2", vocab=160, seed=3)
    path = save_hf(ref, tmp_path_factory.mktemp("qwen") / "hf")
    return ref, distill.load_pretrained(path)[0], path


@pytest.mark.slow
def test_greedy_equals_transformers_on_smollm2_with_staggered_arrivals(smollm2_gguf):
    """Real weights; 2 slots for 4 requests (the later ones wait for a free slot), prompts of
    mixed lengths written in chunks of 16, budgets that end in the middle of a decode chunk."""
    from transformers import AutoModelForCausalLM

    model, tok = distill.load_pretrained(smollm2_gguf)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).eval()
    questions = ["What is 2 + 3?", "Name a prime number larger than ten, and explain briefly why "
                 "it is prime.", "Hi", "Write one sentence about the sea."]
    prompts = [prompt_ids(tok, q, None, False) for q in questions]
    budgets = [7, 13, 5, 10]
    engine = Engine(model, tok, EngineConfig(slots=2, max_len=160, prefill_chunk=16,
                                             decode_steps=4, min_window=32), eos_ids=[])
    got = staggered(engine, prompts, budgets)
    for prompt, budget, c in zip(prompts, budgets, got, strict=True):
        assert c.token_ids == hf_greedy(ref, prompt, budget)
        assert c.finish_reason == "length"


def test_eos_ends_a_sample_and_frees_its_slot(qwen):
    ref, model, _ = qwen
    rng = np.random.RandomState(0)
    for _ in range(20):  # a prompt whose greedy continuation has a token that is new at j > 0
        prompt = rng.randint(3, 160, 9).tolist()
        free = hf_greedy(ref, prompt, 12)
        first = next((j for j in range(1, 12) if free[j] not in free[:j]), None)
        if first is not None:
            break
    engine = Engine(model, None, EngineConfig(slots=1, max_len=64, decode_steps=8),
                    eos_ids=[free[first]])
    a = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    b = engine.submit(prompt, SamplingParams(max_new_tokens=first))  # waits for the one slot
    engine.run_until_idle()
    [ca], [cb] = a.wait(), b.wait()
    assert ca.token_ids == free[:first] and ca.finish_reason == "stop"
    assert cb.token_ids == free[:first] and cb.finish_reason == "length"


def test_seeded_request_is_the_same_alone_and_among_others(qwen):
    """Its random stream is its own: the same tokens beside 6 requests with other settings."""
    _, model, _ = qwen
    mine = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=50, n=2, seed=7)
    alone = Engine(model, None, SHAPE, eos_ids=[]).generate([[4, 5, 6]], mine)
    engine = Engine(model, None, SHAPE, eos_ids=[])
    others = [engine.submit([9] * (3 + i), SamplingParams(max_new_tokens=5 + 3 * i,
                                                          temperature=0.1 * (i + 1), seed=i))
              for i in range(3)]
    engine.step()
    req = engine.submit([4, 5, 6], mine)
    others += [engine.submit([7, 8], SamplingParams(max_new_tokens=9, top_p=0.5,
                                                    temperature=1.0, seed=30 + i))
               for i in range(3)]
    engine.run_until_idle()
    assert [c.token_ids for c in req.wait()] == [c.token_ids for c in alone]
    assert alone[0].token_ids != alone[1].token_ids  # two samples, two streams
    again = Engine(model, None, SHAPE, eos_ids=[]).generate(
        [[4, 5, 6]], mine.model_copy(update={"seed": 8}))
    assert [c.token_ids for c in again] != [c.token_ids for c in alone]


def test_nothing_compiles_after_warmup(qwen):
    """Any temperature, top-p, top-k, seed, n, max_tokens and prompt length within the limits."""
    _, model, _ = qwen
    engine = Engine(model, None, SHAPE)
    programs = engine.warmup()
    assert programs == len(engine.programs) and 5 <= programs <= 30
    # the programs warmed, by shape: what the other tests on this shape compiled does not count
    warmed, before = set(engine.programs), compiles()
    rng = np.random.RandomState(1)
    for i, t in enumerate(np.arange(0.05, 1.0001, 0.05)):
        n, budget = 1 + i % 4, int(rng.randint(1, 40))
        length = int(rng.randint(1, 128 - budget + 1))
        params = SamplingParams(max_new_tokens=budget, temperature=float(t), n=n, seed=i % 10,
                                top_p=float(rng.choice([1.0, 0.9, 0.5])), top_k=int(i % 3) * 7,
                                logprobs=int(i % 2) * 3)
        engine.submit(rng.randint(3, 160, length).tolist(), params)
        if i % 3 == 0:
            engine.step()
    engine.submit([5] * (128 - 1), SamplingParams(max_new_tokens=1))  # the longest prompt
    engine.run_until_idle()
    assert compiles() == before
    assert engine.programs == warmed  # nothing outside the warmed set ran


def test_n_samples_share_one_prefill(qwen):
    _, model, _ = qwen
    engine = Engine(model, None, SHAPE, eos_ids=[])
    prompt = list(range(3, 100))  # two chunks: 64 + 33
    out = engine.generate([prompt], SamplingParams(max_new_tokens=10, n=3))
    assert len({tuple(c.token_ids) for c in out}) == 1  # greedy: three equal samples
    assert [c.sample_index for c in out] == [0, 1, 2]
    prefills = [p for p in engine.programs if p[0] == "prefill"]
    assert ("copy_slot",) in engine.programs and prefills
    single = Engine(model, None, SHAPE, eos_ids=[])
    assert single.generate([prompt], SamplingParams(max_new_tokens=10))[0].token_ids == \
        out[0].token_ids


def test_cancel_streaming_and_stop_strings(toy_qwen2, tok):
    """A cancelled request ends at the next visit without disturbing its neighbour; streamed
    deltas add up to the completion; a stop string cuts the text."""
    model, _ = toy_qwen2
    cfg = EngineConfig(slots=2, max_len=128, decode_steps=4, min_window=32)
    prompt = tok.encode("a b c")
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)
    alone = Engine(model, tok, cfg, eos_ids=[]).generate([prompt], params)
    engine = Engine(model, tok, cfg, eos_ids=[])
    deltas: list[int] = []
    keep = engine.submit(prompt, params, on_delta=lambda req, j, new: deltas.extend(new))
    gone = engine.submit(prompt, SamplingParams(max_new_tokens=100))
    engine.step()
    gone.cancel()
    engine.run_until_idle()
    [c_gone] = gone.wait()
    assert c_gone.finish_reason == "cancelled" and 0 < len(c_gone.token_ids) < 100
    assert keep.wait()[0].token_ids == alone[0].token_ids == deltas
    text = alone[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    [cut] = engine.generate([prompt], params.model_copy(update={"stop": (stop,)}))
    assert cut.finish_reason == "stop" and cut.text == text[: text.find(stop)]


def test_set_weights_swaps_the_model_without_a_compile(qwen):
    _, model, path = qwen
    other, _ = distill.load_pretrained(path)
    nnx.update(other, jax.tree.map(lambda x: x * 1.5, nnx.state(other)))
    params = SamplingParams(max_new_tokens=8)
    want = Engine(other, None, SHAPE, eos_ids=[]).generate([[3, 4, 5]], params)[0].token_ids
    engine = Engine(model, None, SHAPE, eos_ids=[])
    first = engine.generate([[3, 4, 5]], params)[0].token_ids
    before = compiles()
    engine.set_weights(other)
    assert engine.generate([[3, 4, 5]], params)[0].token_ids == want != first
    engine.set_weights(nnx.state(model))
    assert engine.generate([[3, 4, 5]], params)[0].token_ids == first
    assert compiles() == before


def test_sharded_on_a_mesh_it_samples_what_one_device_does(qwen):
    """Weights over fsdp / tensor, slots over data (4 of the suite's 8 CPU devices)."""
    from distill.parallel import make_mesh

    _, model, path = qwen
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    sharded, _ = distill.load_pretrained(path, mesh=mesh)
    prompts = [[3, 4, 5], list(range(10, 40)), [7]]
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=2, n=1)
    engine = Engine(sharded, None, SHAPE, eos_ids=[])
    assert engine.cache.k[0].sharding.spec[0] == "data"  # per-layer [S, K, W, H] on the CPU
    want = Engine(model, None, SHAPE, eos_ids=[]).generate(prompts, params)
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in want]


def test_what_the_engine_cannot_serve_is_one_line(qwen):
    _, model, _ = qwen
    engine = Engine(model, None, EngineConfig(slots=2, max_len=64))
    cases = [([3] * 60, SamplingParams(max_new_tokens=8), "past the engine's limit of 64 tokens"),
             ([3] * 65, SamplingParams(max_new_tokens=1), "a prompt of 65 tokens"),
             ([3], SamplingParams(max_new_tokens=4, n=3), "more than the engine's 2 slots"),
             ([], SamplingParams(), "at least one token")]
    for ids, params, needle in cases:
        with pytest.raises(EngineError, match=needle) as e:
            engine.submit(ids, params)
        assert "\n" not in str(e.value)
    assert engine.pending == 0
    with pytest.raises(EngineError, match="GiB of KV cache .* lower slots or max_len"):
        Engine(model, None, EngineConfig(slots=10**6, max_len=2048))
