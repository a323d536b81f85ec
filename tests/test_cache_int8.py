"""int8 KV cache: int8 keys and values with a float32 scale per token and head; bytes, decode, real 270M."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from gemma import config as C
from gemma.cache import cache_nbytes, dequantize_int8, init_cache, quantize_int8
from gemma.sampler import Sampler, feed
from gemma.transformer import Transformer


@pytest.mark.parametrize("name", list(C.PRESETS))
@pytest.mark.parametrize("max_len", [100, 4096, 32768])
def test_nbytes_equals_formula(name, max_len):
    cfg = C.preset(name)
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, max_len, jnp.int8))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim >= 3)
    slots = cfg.num_global_layers * max_len + cfg.num_local_layers * min(cfg.sliding_window, max_len)
    expected = 2 * 2 * cfg.num_kv_heads * (cfg.head_dim * 1 + 4) * slots  # int8 values + a float32 scale
    assert nbytes == expected == cache_nbytes(cfg, 2, max_len, jnp.int8)
    assert expected < 0.52 * cache_nbytes(cfg, 2, max_len, jnp.bfloat16)


def test_allocated_bytes_and_bad_dtype():
    real = init_cache(C.tiny(), 3, 64, jnp.int8)
    assert real.nbytes == cache_nbytes(C.tiny(), 3, 64, jnp.int8)
    assert real.layers[0].k.dtype == jnp.int8 and real.layers[0].k_scale.shape == real.layers[0].k.shape[:3]
    with pytest.raises(ValueError, match="KV cache dtype 'int16' is not served; expected one of"):
        init_cache(C.tiny(), 1, 8, jnp.int16)


def test_quantize_error_is_half_a_step():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 64)) * jnp.linspace(0.1, 10, 64)
    q, s = quantize_int8(x)
    assert q.dtype == jnp.int8 and s.shape == x.shape[:-1]
    assert np.all(np.abs(np.asarray(dequantize_int8(q, s) - x)) <= 0.5 * np.asarray(s)[..., None] * (1 + 1e-6))
    assert np.asarray(dequantize_int8(*quantize_int8(jnp.zeros((1, 4))))).tolist() == [[0.0] * 4]


@pytest.fixture(scope="module")
def tiny():
    return Transformer(C.tiny(vocab_size=C.VOCAB_SIZE), rngs=nnx.Rngs(0))


def test_decode_over_the_ring_equals_one_shot_prefill(tiny, tokenizer_270m):
    """The same int8 cache arithmetic whichever way tokens arrive: single-token decode through three ring
    wraps (W = 8) gives the one-shot prefill's logits (the chunk's own keys are rounded as the cache
    rounds them) up to rounding flips from other sum orders (measured <= 2.4e-3, against 8e-3 to 1.5e-2
    between int8 and float32 caches), and stays near the float32 cache's."""
    ids = np.random.default_rng(0).integers(3, 256, size=32).tolist()
    s8 = Sampler(tiny, tokenizer_270m, max_len=64, prefill_chunk=5, cache_dtype=jnp.int8)
    logits, cache = s8.prefill([ids[:5]], s8.new_cache(1, 64))
    stepped = [np.asarray(logits[0])]
    for t in ids[5:]:
        logits, cache = s8.prefill([[t]], cache)
        stepped.append(np.asarray(logits[0]))
    assert int(cache.length[0]) == 32 and cache.layers[0].k.dtype == jnp.int8
    one_shot = Sampler(tiny, tokenizer_270m, max_len=64, prefill_chunk=64, cache_dtype=jnp.int8)
    f32 = Sampler(tiny, tokenizer_270m, max_len=64, prefill_chunk=64, cache_dtype=jnp.float32)
    for n in (5, 17, 32):
        want, _ = one_shot.prefill([ids[:n]], one_shot.new_cache(1, 64))
        np.testing.assert_allclose(stepped[n - 5], np.asarray(want[0]), atol=5e-3, rtol=0)
        exact, _ = f32.prefill([ids[:n]], f32.new_cache(1, 64))
        np.testing.assert_allclose(stepped[n - 5], np.asarray(exact[0]), atol=0.05 * np.abs(exact).max(), rtol=0)


def test_real_270m_long_prompt_near_the_bf16_cache(model_270m, tokenizer_270m):
    """A 1,400-token prompt (past the 512 ring), then 4 decode steps, int8 against the bf16 cache: greedy
    tokens identical and next-token probabilities within 2e-2. Raw logits differ by more than the issue's
    2e-2 (int8 per head keeps ~1.5% relative error where bf16 keeps ~0.2%: benchmarks/RESULTS.md)."""
    ids = json.loads((FIXTURES / "perplexity" / "reference.json").read_text())["ids"]
    prompt, forced = ids[:1400], ids[1400:1404]
    step = jax.jit(lambda model, c, t: feed(model, c, t, jnp.zeros((1,), bool)))
    runs = {}
    for dtype in (jnp.bfloat16, jnp.int8):
        s = Sampler(model_270m, tokenizer_270m, max_len=1408, cache_dtype=dtype)
        logits, cache = s.prefill([prompt], s.new_cache(1, 1408))
        rows = [logits[0]]
        for t in forced[:-1]:
            logits, cache = step(model_270m, cache, jnp.asarray([t]))
            rows.append(logits[0])
        runs[dtype] = np.asarray(jnp.stack(rows))
        assert cache.nbytes == (cache_nbytes(model_270m.config, 1, 1408, dtype))
    bf16, int8 = runs[jnp.bfloat16], runs[jnp.int8]
    assert (bf16.argmax(-1) == int8.argmax(-1)).all()
    np.testing.assert_allclose(jax.nn.softmax(int8, -1), jax.nn.softmax(bf16, -1), atol=2e-2, rtol=0)


def test_chat_cache_growth_keeps_the_int8_scales(tiny, tokenizer_270m):
    """gemma.chat moves a full cache into a larger one; an int8 cache's scales move with its values."""
    from gemma.chat import _moved

    s8 = Sampler(tiny, tokenizer_270m, max_len=64, prefill_chunk=64, cache_dtype=jnp.int8)
    ids = np.random.default_rng(1).integers(3, 256, size=12).tolist()
    _, small = s8.prefill([ids], s8.new_cache(1, 16))
    big = _moved(small, s8.new_cache(1, 64))
    for old, new in zip(small.layers, big.layers):
        n = old.num_slots
        for a, b in ((old.k, new.k), (old.v, new.v), (old.k_scale, new.k_scale), (old.v_scale, new.v_scale)):
            np.testing.assert_array_equal(np.asarray(b[:, :n]), np.asarray(a))
        assert float(jnp.abs(new.k_scale).max()) > 0
    want, _ = s8.prefill([[7]], s8.prefill([ids], s8.new_cache(1, 64))[1])
    got, _ = s8.prefill([[7]], big)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-3, rtol=0)
