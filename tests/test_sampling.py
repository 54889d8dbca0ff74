"""Generation through the inference engine: greedy equals transformers, ragged batches arriving
at different times, seeded sampling, stop strings, log-probabilities; the sampling filters."""

import jax
import numpy as np
import pytest
import torch

import distill
from distill import sampling
from distill.inference import Engine, EngineConfig
from distill.sampling import SamplingParams, filter_logits, request_key, row_uniform, sample_rows
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
    """The sort-based reference: top-k (ties at the k-th value kept), then the smallest prefix of
    the sorted distribution whose mass reaches top_p, ties at its last value kept."""
    x = logits / temperature
    if 0 < top_k < len(x):
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p >= 1.0:
        return x
    order = np.argsort(-x, kind="stable")
    p = np.exp((x[order] - x[order][0]).astype(np.float64))  # float64: no rounding in the mass
    p /= p.sum()
    mass, last = 0.0, x[order[0]]
    for idx, pi in zip(order, p, strict=True):
        if mass >= top_p:
            break
        mass, last = mass + pi, x[idx]
    return np.where(x >= last, x, -np.inf)


def _random_rows(rng, b, v):
    """Rows of logits with their own settings: ties, top_k >= V, a tiny top_p, greedy rows."""
    logits = (rng.randn(b, v) * rng.choice([0.5, 3.0, 8.0], (b, 1))).astype(np.float32)
    logits[::3] = np.round(logits[::3])  # many ties
    temperature = rng.choice([0.0, 0.3, 0.7, 1.0, 1.5], b).astype(np.float32)
    top_k = rng.choice([0, 1, 3, 10, v, v + 7], b).astype(np.int32)
    top_p = rng.choice([1.0, 0.95, 0.5, 1e-4], b).astype(np.float32)
    return logits, temperature, top_k, top_p


def _assert_filters_match(logits, temperature, top_k, top_p):
    ours = np.asarray(filter_logits(logits, temperature, top_k, top_p))
    for row, (t, k, p) in enumerate(zip(temperature, top_k, top_p, strict=True)):
        ref = _np_filter(logits[row], t if t > 0 else 1.0, k, p)  # greedy rows come back unscaled
        kept = ~np.isinf(ref)
        assert np.array_equal(~np.isinf(ours[row]), kept), (row, t, k, p)
        np.testing.assert_allclose(ours[row][kept], ref[kept], rtol=1e-6)


def test_per_row_filters_match_a_sort_based_reference():
    rng = np.random.RandomState(1)
    _assert_filters_match(*_random_rows(rng, 200, 50))


def test_filters_match_the_reference_on_a_large_vocabulary():
    """The default blocks on 16k tokens: peaked and flat rows, all ties, masked (-inf) tokens,
    values around 0.0 and -0.0, each with its own settings."""
    rng = np.random.RandomState(5)
    v = 16384
    flat = -np.abs(rng.randn(v)) * 1e-3
    flat[:2] = [-0.0, 0.0]
    masked = rng.randn(v) * 2
    masked[rng.rand(v) < 0.3] = -np.inf
    kinds = [rng.randn(v) * 8, rng.randn(v) * 2, np.zeros(v), masked, np.round(rng.randn(v) * 2),
             rng.randn(v) * 1e-30, flat]
    logits = np.stack([kinds[i % len(kinds)] for i in range(42)]).astype(np.float32)
    _, temperature, top_k, top_p = _random_rows(rng, 42, v)
    _assert_filters_match(logits, temperature, np.where(top_k == 10, 100, top_k), top_p)


@pytest.mark.parametrize("narrow_steps", [12, 1])
def test_the_gathered_paths_and_their_fallbacks_match_the_reference(monkeypatch, narrow_steps):
    """Rows whose kept tokens lie in the top blocks are cut there, the others on a band's blocks,
    or else on the whole vocabulary; all exactly (tiny blocks, so every path occurs in one batch
    of small rows: with 1 narrowing step the band rarely fits, with 12 it mostly does)."""
    monkeypatch.setattr(sampling, "_BLOCK", 4)
    monkeypatch.setattr(sampling, "_GATHER", 4)
    monkeypatch.setattr(sampling, "_NARROW_STEPS", narrow_steps)
    rng = np.random.RandomState(2)
    logits, temperature, top_k, top_p = _random_rows(rng, 300, 64)
    x = logits / np.where(temperature > 0, temperature, 1.0)[:, None]
    args = (x, sampling._order_keys(x), np.exp(x - x.max(-1, keepdims=True)),
            np.where(top_k >= 64, 0, top_k), top_p)
    args += (args[2].sum(-1),)
    top_ok = np.asarray(sampling._cut_top_blocks(*args)[1])
    band_ok = np.asarray(sampling._cut_banded(*args)[1])
    filtering = (args[3] > 0) | (top_p < 1)
    assert top_ok[filtering].any() and not top_ok[filtering].all()
    assert band_ok[~top_ok].any() and not band_ok[~top_ok].all()
    _assert_filters_match(logits, temperature, top_k, top_p)


def _filtered_softmax(logits, temperature, top_k, top_p):
    x = _np_filter(logits.astype(np.float64), temperature, top_k, top_p)
    p = np.exp(x - x.max())
    return p / p.sum()


def _draws(logits, temperature, top_k, top_p, n=20_000, seed=0):
    """The empirical distribution of n draws of `sample_rows` on n copies of one row."""
    u = jax.random.uniform(jax.random.PRNGKey(seed), (n,))
    full = lambda v, dt: np.full(n, v, dt)  # noqa: E731
    tok = sample_rows(np.tile(logits, (n, 1)), u, full(temperature, np.float32),
                      full(top_k, np.int32), full(top_p, np.float32))
    return np.bincount(np.asarray(tok), minlength=len(logits)) / n


@pytest.mark.parametrize("temperature, top_k, top_p, wrong", [
    (0.7, 0, 0.8, (0.7, 0, 1.0)),  # top-p against no filter
    (1.0, 0, 0.6, (1.0, 0, 0.7)),  # top-p (4 tokens) against one that keeps one token more
    (1.3, 4, 1.0, (1.3, 5, 1.0)),  # top-k against k + 1
    (1.0, 5, 0.7, (1.0, 0, 0.7)),  # top-p on the top-k-filtered distribution (3 tokens), not
])                                 # on the whole one (5 tokens)
def test_sampled_tokens_follow_the_filtered_softmax(temperature, top_k, top_p, wrong):
    logits = np.array([2.0, 1.6, 1.4, 1.1, 0.9, 0.7, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5], np.float32)
    want = _filtered_softmax(logits, temperature, top_k, top_p)
    other = _filtered_softmax(logits, *wrong)
    got = _draws(logits, temperature, top_k, top_p)
    tv = lambda a, b: 0.5 * np.abs(a - b).sum()  # noqa: E731
    assert tv(want, other) > 0.06  # the wrong filter is far from the right one ...
    assert tv(got, want) < 0.02 and tv(got, other) > 0.02  # ... and the draws tell them apart
    assert got[want == 0].sum() == 0  # a removed token is never drawn


def test_greedy_rows_take_the_first_maximum_and_no_removed_token_is_drawn():
    logits = np.array([[0.0, 3.0, 3.0, 1.0, -np.inf], [5.0, 1.0, 5.0, 2.0, 0.0],
                       [1.0, 2.0, 3.0, -np.inf, -np.inf], [0.0, 0.0, 9.0, 0.0, 0.0]], np.float32)
    temperature = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    for u in (0.0, 0.5, 1.0 - 2.0**-24):  # 1 - 2^-24: the largest float32 below 1
        tok = np.asarray(sample_rows(logits, np.full(4, u, np.float32), temperature,
                                     np.array([0, 0, 2, 0], np.int32),
                                     np.array([1.0, 1.0, 1.0, 1e-3], np.float32)))
        assert tok[0] == 1 and tok[1] == 0  # argmax: the first of tied maxima
        assert tok[2] in (1, 2) and tok[3] == 2


def test_a_rows_random_stream_depends_on_its_own_key_only():
    keys = np.stack([request_key(seed, s) for seed in range(16) for s in range(4)])  # 64 rows
    steps = np.arange(64, dtype=np.int32) * 7
    batch = np.asarray(row_uniform(keys, steps))
    alone = np.asarray(row_uniform(keys[9:10], steps[9:10]))
    assert batch[9] == alone[0] and len(set(batch.tolist())) == 64
    assert ((batch >= 0) & (batch < 1)).all()
    want = jax.random.fold_in(jax.random.PRNGKey(2), 1)
    np.testing.assert_array_equal(request_key(2, 1), np.asarray(want))


def test_new_per_row_settings_compile_nothing():
    step = jax.jit(sample_rows)
    rng = np.random.RandomState(3)
    logits = rng.randn(8, 40).astype(np.float32)
    for _ in range(4):
        _, temperature, top_k, top_p = _random_rows(rng, 8, 40)
        step(logits, rng.rand(8).astype(np.float32), temperature, top_k, top_p)
    assert step._cache_size() == 1


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
