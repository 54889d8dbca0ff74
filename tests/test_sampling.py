"""Generation through the inference engine: greedy equals transformers, ragged batches arriving
at different times, seeded sampling, stop strings, log-probabilities; the sampling filters."""

import numpy as np
import pytest
import torch

import distill
from distill.inference import Engine, EngineConfig
from distill.sampling import SamplingParams, filter_logits
from tests.helpers import save_hf, tiny_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_hf("qwen2", vocab=160, seed=3)
    model, _ = distill.load_pretrained(save_hf(ref, tmp_path_factory.mktemp("s") / "hf"))
    return ref, model


def _engine(model, slots=4, eos_ids=(), tokenizer=None, **config):
    """An engine over `model` (no end-of-sequence id unless given), 256 tokens per sequence."""
    return Engine(model, tokenizer, EngineConfig(slots=slots, max_len=256, **config),
                  eos_ids=list(eos_ids))


def _hf_greedy(ref, prompt, n):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_on_a_ragged_batch(pair):
    ref, model = pair
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 160, n).tolist() for n in (3, 17, 40)]
    # two slots: the third prompt is admitted when one of the first two ends
    outs = _engine(model, slots=2).generate(prompts, SamplingParams(max_new_tokens=32))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt, 32)
        assert out.finish_reason == "length"


def test_eos_stops_a_row_and_reports_stop(pair):
    ref, model = pair
    prompt = [5, 6, 7, 8]
    free = _hf_greedy(ref, prompt, 12)
    eos = free[5]  # pretend the 6th greedy token is end-of-sequence
    [out] = _engine(model, eos_ids=[eos]).generate([prompt], SamplingParams(max_new_tokens=12))
    first = free.index(eos)
    assert out.token_ids == free[:first] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_samples_differ(pair):
    _, model = pair
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=40, n=4, seed=7)
    engine = _engine(model)
    a = engine.generate([[4, 5, 6]], params)
    b = engine.generate([[4, 5, 6]], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert len({tuple(o.token_ids) for o in a}) == 4  # n samples at T > 0 differ
    c = engine.generate([[4, 5, 6]], SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [o.token_ids for o in c] != [o.token_ids for o in a]


def _np_filter(logits, temperature, top_k, top_p):
    x = logits / temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(-x)
    p = np.exp(x[order] - x[order][0])
    p /= p.sum()
    keep = np.zeros_like(x, bool)
    mass = 0.0
    for idx, pi in zip(order, p, strict=True):
        if mass >= top_p:
            break
        keep[idx] = True
        mass += pi
    return np.where(keep, x, -np.inf)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.9), (0.6, 5, 1.0), (0.7, 8, 0.5)])
def test_filters_match_a_numpy_reference(temperature, top_k, top_p):
    logits = np.random.RandomState(1).randn(3, 50).astype(np.float32) * 3
    ours = np.asarray(filter_logits(logits, temperature, top_k, top_p))
    for row in range(3):
        ref = _np_filter(logits[row], temperature, top_k, top_p)
        assert np.array_equal(np.isinf(ours[row]), np.isinf(ref))
        np.testing.assert_allclose(ours[row][~np.isinf(ref)], ref[~np.isinf(ref)], rtol=1e-6)


def test_logprobs_match_transformers_scores(pair):
    ref, model = pair
    prompt = [9, 8, 7, 6, 5]
    [out] = _engine(model).generate([prompt], SamplingParams(max_new_tokens=8, logprobs=3))
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    logp = torch.log_softmax(torch.stack(hf.logits, 1)[0].float(), -1).numpy()  # [8, V]
    assert out.token_ids == hf.sequences[0, len(prompt):].tolist()
    np.testing.assert_allclose(out.token_logprobs, logp[np.arange(8), out.token_ids], atol=1e-4)
    np.testing.assert_allclose(out.top_logprobs, -np.sort(-logp, axis=-1)[:, :3], atol=1e-4)
    assert [row[0] for row in out.top_ids] == out.token_ids  # greedy picks the top-1


class _Letters:
    """A stand-in tokenizer: token i is the letter chr(97 + i % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_string_ends_the_row_early_and_cuts_text_and_tokens(pair):
    _, model = pair
    tok = _Letters()
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    engine = _engine(model, tokenizer=tok)
    free = engine.generate(prompts, SamplingParams(max_new_tokens=100))
    # a stop string that the first row's free-running text reaches at its 40th token or so
    stop = free[0].text[38:41]
    first = free[0].text.find(stop)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=100, stop=(stop,)))
    assert outs[0].text == free[0].text[:first] and outs[0].finish_reason == "stop"
    assert outs[0].token_ids == free[0].token_ids[: first + len(stop)]
    other = free[1].text.find(stop)
    if other < 0:  # the second row never sees it: it runs to the length limit, unchanged
        assert outs[1].token_ids == free[1].token_ids and outs[1].finish_reason == "length"
    else:
        assert outs[1].text == free[1].text[:other] and outs[1].finish_reason == "stop"


def test_unrolled_decoding_equals_the_scanned_layers(pair):
    """The CPU decode path (layers unrolled over per-layer copies of the weights and caches)
    computes what the scan over the stacked arrays computes: tokens and log-probabilities."""
    _, model = pair
    prompts = [[4, 5, 6], list(range(3, 40))]
    params = SamplingParams(max_new_tokens=24, temperature=0.8, n=2, seed=3, logprobs=3)
    runs = {}
    for mode in ("0", "1"):
        runs[mode] = _engine(model, unroll=mode == "1").generate(prompts, params)
    for a, b in zip(runs["0"], runs["1"], strict=True):
        assert a.token_ids == b.token_ids and a.top_ids == b.top_ids
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-5)


def test_unstacked_layers_are_per_layer_arrays_and_a_stacked_cache_stays_stacked(pair):
    import jax.numpy as jnp
    from flax import nnx

    from distill.models.decoder import Unstacked, layer_stack_paths, unstack_layers

    _, model = pair
    graphdef, state = nnx.split(model)
    unstacked = unstack_layers(state, layer_stack_paths(model))
    wq = unstacked["blocks"]["attn"]["wq_dnh"].get_value()
    stacked = state["blocks"]["attn"]["wq_dnh"].get_value()
    assert isinstance(wq, Unstacked) and len(wq) == stacked.shape[0]
    np.testing.assert_array_equal(wq[1], stacked[1])
    assert not isinstance(unstacked["embed"]["embedding_vd"].get_value(), Unstacked)
    # unstacked weights with a stacked cache: the cache comes back stacked, entries written
    cache = model.init_cache(1, 8)
    tokens = jnp.asarray([[5, 6, 7]])
    valid = jnp.zeros((1, 8), bool).at[:, :3].set(True)
    want, want_cache = model.forward_cached(tokens, jnp.arange(3)[None], cache, 0, valid)
    got, got_cache = nnx.merge(graphdef, unstacked).forward_cached(
        tokens, jnp.arange(3)[None], cache, 0, valid)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got_cache.k.shape == cache.k.shape
    np.testing.assert_allclose(got_cache.k, want_cache.k, atol=1e-6)


def test_one_engine_samples_again_as_a_fresh_one(pair):
    """An engine prepares its weights (per-layer copies on the CPU) once: a second call on it
    gives what its first call and a fresh engine give."""
    _, model = pair
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=5)
    engine = _engine(model, unroll=True)
    copies = engine.weights
    first = engine.generate([[4, 5, 6]], params)
    assert engine.generate([[4, 5, 6]], params)[0].token_ids == first[0].token_ids
    assert engine.weights is copies
    assert _engine(model).generate([[4, 5, 6]], params)[0].token_ids == first[0].token_ids
