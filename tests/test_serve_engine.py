"""Serving engine: continuous batching on the compact cache equals the Sampler, per-row sampling,
stops, cancel, weight updates, no compile per request after warm-up."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config as C
from gemma.sampler import Sampler, categorical_from_uniform, sample_rows
from gemma.serve import Engine, Request, StaleWeights
from gemma.serve import engine as engine_module
from gemma.transformer import Transformer


def tiny_model(seed: int = 0):
    """Random 7-layer model (W = 8) with the real vocabulary and randomized norms (as in test_sampler)."""
    model = Transformer(C.tiny(vocab_size=C.VOCAB_SIZE), rngs=nnx.Rngs(seed))
    for i, (_, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.Param) and var[...].ndim == 1:
            var[...] = 0.3 * jax.random.normal(jax.random.key(i + 100 * seed), var[...].shape)
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(tiny, tokenizer_270m):
    with Engine(tiny, tokenizer_270m, max_batch=4, max_len=128, prefill_chunk=8, max_wait_ms=2) as e:
        yield e


@pytest.fixture(scope="module")
def sampler(tiny, tokenizer_270m):
    return Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=8)


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, size=n).tolist() for n in lengths]


def test_staggered_greedy_equals_sampler_generate(engine, sampler):
    """Requests of different lengths (some prefilled in several chunks) arriving while others decode,
    more of them than slots: each one's greedy ids equal Sampler.generate's for it alone."""
    rows = prompts(0, (3, 17, 11, 30, 5, 9, 24))
    gens = []
    for i, row in enumerate(rows):
        gens.append(engine.submit(Request(tuple(row), max_tokens=5 + i % 4)))
        time.sleep(0.03 * (i % 3))
    for i, (row, gen) in enumerate(zip(rows, gens)):
        choice = gen.wait(120)[0]
        want = sampler.generate(row, max_new_tokens=5 + i % 4)
        assert choice.tokens == want.tokens, i
        assert choice.text == want.text and choice.finish_reason == "length"
    assert engine.metrics.mean_batch > 1  # they did share decode steps


def test_output_does_not_depend_on_batch_mates(engine):
    """Greedy and seeded sampling: one request alone, and amid three others, gives the same ids."""
    row = prompts(1, (13,))[0]
    for kw in (dict(), dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)):
        alone = engine.submit(Request(tuple(row), max_tokens=10, **kw)).wait(60)[0].tokens
        mates = [engine.submit(Request(tuple(r), max_tokens=14, temperature=1.0, top_p=0.5, seed=None))
                 for r in prompts(2, (4, 20))]
        crowd = engine.submit(Request(tuple(row), max_tokens=10, **kw))
        mates.append(engine.submit(Request(tuple(row), max_tokens=3, temperature=1.0)))
        assert crowd.wait(60)[0].tokens == alone, kw
        for m in mates:
            m.wait(60)


def test_seeds_and_n(engine):
    row = tuple(prompts(3, (6,))[0])
    a = engine.submit(Request(row, max_tokens=12, temperature=1.0, seed=5, n=2)).wait(60)
    b = engine.submit(Request(row, max_tokens=12, temperature=1.0, seed=5, n=2)).wait(60)
    c = engine.submit(Request(row, max_tokens=12, temperature=1.0, seed=6)).wait(60)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert a[0].tokens != a[1].tokens  # the two choices draw differently
    assert c[0].tokens != a[0].tokens


def test_stop_strings_and_ids(engine, sampler, tokenizer_270m):
    row = prompts(4, (7,))[0]
    full = engine.submit(Request(tuple(row), max_tokens=12)).wait(60)[0]
    stop = full.text[len(full.text) // 2:][:3]
    got = engine.submit(Request(tuple(row), max_tokens=12, stop=(stop,))).wait(60)[0]
    want = sampler.generate(row, max_new_tokens=12, stop=[stop])
    assert got.finish_reason == "stop" and got.text == want.text and got.tokens == want.tokens
    assert stop not in got.text
    cut = full.tokens[4]
    got = engine.submit(Request(tuple(row), max_tokens=12, stop_ids=(cut,))).wait(60)[0]
    assert got.finish_reason == "stop" and got.tokens == full.tokens[:full.tokens.index(cut)]


def test_logprobs(engine, tiny):
    row = prompts(5, (9,))[0]
    choice = engine.submit(Request(tuple(row), max_tokens=4, logprobs=3)).wait(60)[0]
    seq = list(row)
    for token, lp, top in zip(choice.tokens, choice.logprobs, choice.top_logprobs):
        want = jax.nn.log_softmax(tiny(jnp.asarray([seq]))[0, -1])
        assert abs(lp - float(want[token])) < 1e-3
        assert [i for i, _ in top] == np.argsort(-np.asarray(want))[:3].tolist()
        assert top[0] == (token, pytest.approx(lp, abs=1e-5))  # greedy: the chosen one is the best
        seq.append(token)


def test_cancel_frees_the_slot(engine):
    events = []
    gen = engine.submit(Request(tuple(prompts(6, (5,))[0]), max_tokens=100, temperature=1.0),
                        listener=events.append)
    deadline = time.monotonic() + 60
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    gen.cancel()
    choice = gen.wait(30)[0]
    assert choice.finish_reason == "cancelled" and len(choice.tokens) < 100
    assert events[-1].finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0


def test_bad_requests(engine):
    with pytest.raises(ValueError, match="exceeds the engine's max_len of 128"):
        engine.submit(Request((2,) * 100, max_tokens=29))
    with pytest.raises(ValueError, match="n \\(5\\) exceeds max_batch \\(4\\)"):
        engine.submit(Request((2, 3), n=5))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.submit(Request((2, 10**7)))
    for kw, what in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                     (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"), (dict(logprobs=6), "logprobs"),
                     (dict(stop=("",)), "stop")]:
        with pytest.raises(ValueError, match=what):
            Request((2, 3), **kw)
    with pytest.raises(ValueError, match="empty"):
        Request(())


def test_no_compile_per_request_after_warmup(engine):
    engine.warmup()
    sizes = lambda: (engine_module._decode_step._cache_size(), engine_module._install._cache_size())
    from gemma.sampler import _extend

    before, extend_before = sizes(), _extend._cache_size()
    rows = prompts(7, (2, 7, 15, 19, 33, 50))
    gens = [engine.submit(Request(tuple(r), max_tokens=5 + i, temperature=i % 2, top_k=(i % 3) or None, n=1 + i % 2,
                                  logprobs=i % 2)) for i, r in enumerate(rows)]
    for g in gens:
        g.wait(120)
    assert sizes() == before and _extend._cache_size() == extend_before


def test_weight_update_between_steps(tiny, tokenizer_270m):
    """Requests started before an update report the old version first and the new one last; a
    request submitted after update_weights returns runs wholly on the new weights."""
    other = tiny_model(seed=1)
    with Engine(tiny, tokenizer_270m, max_batch=2, max_len=128, prefill_chunk=8, max_staleness=1) as engine:
        row = tuple(prompts(8, (6,))[0])
        long = engine.submit(Request(row, max_tokens=60, temperature=1.0, weights_version=0))
        while not long.choices[0].tokens:
            time.sleep(0.005)
        engine.update_weights(other, version=1)
        after = engine.submit(Request(row, max_tokens=8, weights_version=1)).wait(60)[0]
        old = long.wait(60)[0]
        assert (old.first_version, old.last_version) == (0, 1)
        assert (after.first_version, after.last_version) == (1, 1)
        assert after.tokens == Sampler(other, tokenizer_270m, max_len=128, prefill_chunk=8).generate(
            list(row), max_new_tokens=8).tokens
        engine.update_weights(nnx.split(tiny)[1], version=2)
        with pytest.raises(StaleWeights, match="version 0; the server is at 2"):
            engine.submit(Request(row, weights_version=0))
        with pytest.raises(ValueError, match="above the current 2"):
            engine.update_weights(other, version=2)
        with pytest.raises(ValueError, match="does not match"):
            engine.update_weights({"x": jnp.zeros(3)}, version=3)


def test_generate_batch_for_trainers(engine, sampler):
    texts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    out = engine.generate_batch(texts, max_tokens=6)
    assert [o.tokens for o in out] == [sampler.generate(t, max_new_tokens=6).tokens for t in texts]
    a = engine.generate_batch(texts, max_tokens=6, temperature=1.0, seed=11)
    b = engine.generate_batch(texts, max_tokens=6, temperature=1.0, seed=[11, 12, 13])
    assert [o.tokens for o in a] == [o.tokens for o in b]


def test_partial_batch_starts_after_max_wait(tiny, tokenizer_270m):
    with Engine(tiny, tokenizer_270m, max_batch=4, max_len=64, prefill_chunk=8, max_wait_ms=300) as engine:
        t = time.monotonic()
        engine.submit(Request((2, 5, 6), max_tokens=2)).wait(60)
        first = time.monotonic() - t
        t = time.monotonic()
        engine.submit(Request((2, 5, 6), max_tokens=2)).wait(60)
        assert first >= 0.3 and time.monotonic() - t >= 0.3  # one request alone waited for company, then ran


def test_sample_rows_per_row_parameters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05] + [0.0] * 4] * 4) + 1e-30)
    temperature = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    top_k = jnp.asarray([0, 2, 0, 1])
    top_p = jnp.asarray([1.0, 1.0, 0.6, 1.0])
    draws = np.asarray(jax.vmap(lambda k: sample_rows(logits, jax.random.split(k, 4), temperature, top_k, top_p))(
        jax.random.split(jax.random.key(0), 300)))
    assert set(draws[:, 0]) == {0} and set(draws[:, 1]) == {0, 1} and set(draws[:, 2]) == {0, 1}
    assert set(draws[:, 3]) == {0}
    plain = np.asarray(jax.vmap(lambda k: sample_rows(logits, jax.random.split(k, 4), jnp.ones(4),
                                                       jnp.zeros(4, jnp.int32), jnp.ones(4)))(
        jax.random.split(jax.random.key(1), 2000)))
    np.testing.assert_allclose(np.bincount(plain.ravel(), minlength=4)[:4] / plain.size, [0.5, 0.3, 0.15, 0.05],
                               atol=0.03)


def test_inverse_cdf_is_the_categorical_of_the_filtered_distribution():
    """Evenly spaced u in (0, 1] pick each id in proportion to its probability (the draw's map from u is
    exact), and no u, 1.0 and the running sums at excluded ids included, picks an excluded id."""
    values = jnp.asarray([[1.0, -jnp.inf, 0.2, -jnp.inf, -jnp.inf, 2.0, 0.5, -jnp.inf]])
    want = np.where(np.isfinite(values[0]), np.exp(values[0] - values[0].max()), 0.0)
    want /= want.sum()
    u = (np.arange(100_000) + 1.0) / 100_000
    picks = np.asarray(jax.jit(jax.vmap(lambda x: categorical_from_uniform(x[None], values)[0]))(u))
    np.testing.assert_allclose(np.bincount(picks, minlength=8) / u.size, want, atol=2e-5)

    rng = np.random.default_rng(0)  # the real vocabulary: the scan's sums move at some -inf ids
    x = np.where(rng.random((4, C.VOCAB_SIZE)) < 0.5, -np.inf, 3 * rng.normal(size=(4, C.VOCAB_SIZE)))
    x[:, -1000:] = -np.inf  # trailing excluded ids, as after sorting and truncating
    x = jnp.asarray(x, jnp.float32)
    prob = np.asarray(jax.nn.softmax(x, axis=-1))
    cdf = np.asarray(jax.jit(lambda v: jnp.cumsum(jax.nn.softmax(v, axis=-1), axis=-1))(x))
    draw = jax.jit(categorical_from_uniform)
    for row in range(4):
        positive = prob[row] > 0
        total = cdf[row][positive].max()
        moved = np.flatnonzero(~positive[1:] & (np.diff(cdf[row]) != 0)) + 1  # sums that step at excluded ids
        assert moved.size, "the scan's sums no longer move at excluded ids: pick another case"
        edges = (cdf[row][moved[:: max(1, moved.size // 60)]] / total).astype(np.float32)
        u = np.concatenate([edges, np.nextafter(edges, np.float32(0)), [1.0, 2.0 ** -23]]).clip(2.0 ** -23, 1.0)
        picks = np.concatenate([np.asarray(draw(jnp.asarray(u[i:i + 32], jnp.float32),
                                                jnp.broadcast_to(x[row], (len(u[i:i + 32]), x.shape[1]))))
                                for i in range(0, u.size, 32)])
        assert positive[picks].all(), "an id of probability 0 was drawn"


def test_sample_rows_matches_exact_probabilities():
    """Temperature, top-k and top-p together: 20000 draws within 5 sigma of the exact probabilities."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0, 0.0, 0.1]])
    t, k, p = 0.7, 5, 0.9
    z = np.exp(np.asarray(logits[0], np.float64) / t)
    order = np.argsort(-z)
    probs = z[order[:k]] / z[order[:k]].sum()  # top-p applies to the top-k's renormalized mass
    keep = order[:k][(np.cumsum(probs) - probs) < p]
    want = np.zeros(8)
    want[keep] = z[keep] / z[keep].sum()
    n = 20_000
    draws = np.asarray(jax.jit(jax.vmap(lambda key: sample_rows(logits, key[None], jnp.asarray([t]),
                                                                 jnp.asarray([k]), jnp.asarray([p]))[0]))(
        jax.random.split(jax.random.key(3), n)))
    freq = np.bincount(draws, minlength=8) / n
    assert set(np.flatnonzero(freq)) <= set(keep.tolist())
    assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9), (freq, want)


def test_close_ends_unfinished_requests(tiny, tokenizer_270m):
    engine = Engine(tiny, tokenizer_270m, max_batch=1, max_len=128, prefill_chunk=8)
    gens = [engine.submit(Request((2, 7, 8), max_tokens=100, temperature=1.0)) for _ in range(3)]
    engine.close()
    for g in gens:
        assert g.done and g.choices[0].finish_reason in ("error", "length")
    assert not any(t.name == "gemma-engine" and t.is_alive() for t in threading.enumerate() if t is engine._thread)


def test_int8_kv_cache_greedy_equals_sampler_generate(tiny, tokenizer_270m):
    """An int8 KV cache through the engine (its per-token scales installed into slots and carried through
    the decode step's row prefix) gives Sampler.generate's greedy ids with the same int8 cache."""
    rows = prompts(9, (4, 19, 10))
    with Engine(tiny, tokenizer_270m, max_batch=4, max_len=128, prefill_chunk=8, max_wait_ms=2,
                cache_dtype=jnp.int8) as engine:
        assert engine._cache.layers[0].k_scale is not None
        gens = [engine.submit(Request(tuple(r), max_tokens=8)) for r in rows]
        got = [g.wait(120)[0].tokens for g in gens]
        assert engine._cache.layers[0].k_scale is not None  # still carried after the steps
    s8 = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=8, cache_dtype=jnp.int8)
    assert got == [s8.generate(r, max_new_tokens=8).tokens for r in rows]


def test_joining_prompts_prefill_together(tiny, tokenizer_270m):
    """One-chunk prompts that join together are prefilled in one call (left-padded to the widest, rows a
    power of two, at most prefill_chunk tokens), and each one's greedy ids still equal Sampler.generate's
    for it alone; after warm-up no arrival pattern compiles anything."""
    from gemma.sampler import _extend

    rows = prompts(10, (3, 9, 17, 30, 12, 2))
    with Engine(tiny, tokenizer_270m, max_batch=6, max_len=128, prefill_chunk=64, max_wait_ms=50,
                prefill_rows=4) as engine:
        calls = []
        prefill = engine.sampler.prefill
        engine.sampler.prefill = lambda prompts, cache: calls.append([len(p) for p in prompts]) or prefill(
            prompts, cache)
        got = engine.generate_batch(rows, max_tokens=6)
        # widths 16, 16, 32, 32, 16, 16: [3, 9] in 2 rows of 16; [17, 30] in 2 of 32; [12, 2] in 2 of 16
        assert calls == [[3, 9], [17, 30], [12, 2]]
        sampler = Sampler(tiny, tokenizer_270m, max_len=128, prefill_chunk=64)
        assert [c.tokens for c in got] == [sampler.generate(r, max_new_tokens=6).tokens for r in rows]
        with pytest.raises(ValueError, match="prefill_rows must be an int >= 1"):
            Engine(tiny, tokenizer_270m, prefill_rows=0)
        engine.warmup()
        sizes = lambda: (engine_module._decode_step._cache_size(), engine_module._install._cache_size(),
                         _extend._cache_size())
        before = sizes()
        for i, lengths in enumerate([(5,), (3, 4, 5), (20, 2, 40, 7, 70), (1, 1, 1, 1, 1, 1)]):
            gens = []
            for j, r in enumerate(prompts(11 + i, lengths)):
                gens.append(engine.submit(Request(tuple(r), max_tokens=3 + j, temperature=j % 2, seed=j)))
                time.sleep(0.01 * (j % 2))
            for g in gens:
                g.wait(120)
        assert sizes() == before
