"""kernels.cpu_decode: the cache write, one-token attention and row argmax on CPU, against XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma import config as C
from gemma.cache import init_cache
from gemma.sampler import Sampler, feed
from gemma.transformer import Transformer
from kernels import cpu_decode, reference

pytestmark = pytest.mark.skipif(not cpu_decode.usable(), reason="needs x86 AVX-512, a C++ compiler and the CPU backend")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_write_equals_the_scatter(dtype):
    """Rows copied in place (the output aliases the donated cache); slots outside [0, S) dropped."""
    rng = np.random.default_rng(0)
    dst = jnp.asarray(rng.standard_normal((3, 10, 2, 5)) * 10, dtype)
    src = jnp.asarray(rng.standard_normal((3, 2, 2, 5)) * 10, dtype)
    slots = jnp.asarray([[0, 9], [10, 3], [-1, 4]], jnp.int32)
    keep = (slots >= 0) & (slots < 10)
    want = dst.at[jnp.arange(3)[:, None], jnp.where(keep, slots, 10)].set(src, mode="drop")
    got = jax.jit(cpu_decode.write, donate_argnums=0)(jnp.array(dst), src, slots)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    kept = jax.jit(cpu_decode.write)(dst, src, slots)  # not donated: XLA copies, dst unchanged
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(want))
    assert not np.array_equal(np.asarray(dst), np.asarray(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,s,k,g,h,softcap", [(3, 37, 2, 3, 20, None), (2, 512, 1, 4, 256, None),
                                                (4, 64, 2, 5, 16, 50.0), (1, 5, 1, 1, 8, None), (2, 33, 4, 2, 128, None)])
def test_attention_equals_the_reference(dtype, b, s, k, g, h, softcap):
    """Ragged head dims, query groups above the kernel's 4, a row that sees no key (zeros), soft-capping."""
    rng = np.random.default_rng(b * 100 + s)
    q = jnp.asarray(rng.standard_normal((b, 1, k * g, h)), dtype)
    keys = jnp.asarray(rng.standard_normal((b, s, k, h)), dtype)
    values = jnp.asarray(rng.standard_normal((b, s, k, h)), dtype)
    k_pos = jnp.asarray(rng.integers(-5, s, (b, s)), jnp.int32)
    lo = jnp.asarray(rng.integers(-3, s // 2 + 1, (b, 1)), jnp.int32)
    hi = (lo + s // 3).at[0].set(-100)  # row 0: nothing visible
    f32 = lambda a: a.astype(jnp.float32)
    want = reference.attention(f32(q), f32(keys), f32(values), lo, hi, scale=0.1, softcap=softcap, k_pos=k_pos)
    got = jax.jit(lambda *a: cpu_decode.attention(*a, scale=0.1, softcap=softcap))(q, keys, values, lo, hi, k_pos)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 2e-6 if dtype == jnp.float32 else 1e-2  # bf16: the output's rounding
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)
    assert not np.asarray(got[0], np.float32).any()


def test_argmax_equals_jnp_argmax():
    """First of equal maxima, a row of -inf (0), NaNs (the first), a limit below the row's length."""
    rng = np.random.default_rng(0)
    f = jax.jit(cpu_decode.argmax, static_argnums=1)
    for b, v, limit in [(16, 262144, 262144), (5, 37, 37), (5, 100, 50), (5, 33, 33)]:
        x = rng.standard_normal((b, v)).astype(np.float32)
        x[0, 5] = x[0, 17] = 100
        x[1, :] = -np.inf
        x[2, 7] = x[2, 3] = np.nan
        x[3, :] = 1.0
        x[4, limit - 1] = 1e9
        want = np.asarray(jnp.argmax(jnp.asarray(x)[:, :limit], axis=-1))
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), limit)), want)
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray([[3.0]]), None)), [0])


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, jnp.float32, jnp.int8])
def test_decode_steps_match_the_xla_path(cache_dtype, monkeypatch):
    """A few decode steps of a tiny model, rows at different lengths (one stopped), through the kernels and
    through XLA (GEMMA_NO_CPU_DECODE): the first layer's cache bitwise, the rest and the logits within rounding."""
    model = Transformer(C.tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def run():
        step = jax.jit(lambda st, c, t, s: feed(nnx.merge(graphdef, st), c, t, s))
        cache = init_cache(model.config, 3, 40, cache_dtype)
        outs = []
        for i in range(12):  # past the tiny model's window: the ring wraps
            token = jnp.asarray([5 + i, 77, 200 - i], jnp.int32)
            stopped = jnp.asarray([False, i % 3 == 0, i >= 6])
            logits, cache = step(state, cache, token, stopped)
            outs.append(np.asarray(logits))
        return np.stack(outs), cache

    got, got_cache = run()
    monkeypatch.setenv("GEMMA_NO_CPU_DECODE", "1")
    want, want_cache = run()
    # XLA's path rounds the softmax weights to a bf16 cache's dtype before the sum over values; the kernel
    # keeps them in f32
    np.testing.assert_allclose(got, want, **(dict(atol=5e-3, rtol=0) if cache_dtype == jnp.bfloat16 else
                                             dict(atol=2e-4, rtol=1e-4)))
    first = jax.tree.leaves(got_cache.layers[0]), jax.tree.leaves(want_cache.layers[0])
    for a, b in zip(*first):  # the first layer's keys and values come from the embeddings alone: the same bits
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(got_cache.length), np.asarray(want_cache.length))
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):  # deeper: the attention's rounding
        if a.dtype == jnp.int8:
            assert np.mean(np.asarray(a) != np.asarray(b)) < 0.05
        else:
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2, rtol=0)


def test_sampler_greedy_through_the_kernels_is_the_xla_path(monkeypatch, tokenizer_270m):
    """Sampler.generate (prefill on XLA, decode on the kernels) continues as with XLA's decode."""
    model = Transformer(C.tiny(), rngs=nnx.Rngs(0))
    prompts = [[2, 10, 11, 12], [2, 99]]
    got = Sampler(model, tokenizer_270m, max_len=64).generate(prompts, max_new_tokens=12).tokens
    monkeypatch.setenv("GEMMA_NO_CPU_DECODE", "1")
    want = Sampler(model, tokenizer_270m, max_len=64).generate(prompts, max_new_tokens=12).tokens
    assert got == want


def test_row_prefix_of_a_larger_cache():
    """The engine's partial steps: write and attention on the first rows of a cache holding more rows (the rest
    untouched), put_rows / take_rows against dynamic_update_slice / slicing."""
    rng = np.random.default_rng(1)
    cache = jnp.asarray(rng.standard_normal((5, 12, 1, 16)), jnp.bfloat16)
    src = jnp.asarray(rng.standard_normal((2, 1, 1, 16)), jnp.bfloat16)
    slots = jnp.asarray([[3], [11]], jnp.int32)
    got = np.asarray(jax.jit(cpu_decode.write)(cache, src, slots))
    want = np.asarray(cache).copy()
    want[0, 3], want[1, 11] = np.asarray(src[0, 0]), np.asarray(src[1, 0])
    np.testing.assert_array_equal(got, want)
    q = jnp.asarray(rng.standard_normal((2, 1, 2, 16)), jnp.float32)
    k_pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    lo, hi = jnp.zeros((2, 1), jnp.int32), jnp.full((2, 1), 7, jnp.int32)
    out = jax.jit(lambda *a: cpu_decode.attention(*a, scale=0.25))(q, cache, cache, lo, hi, k_pos)
    kv = cache[:2].astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference.attention(q, kv, kv, lo, hi, scale=0.25, k_pos=k_pos)),
                               atol=2e-6, rtol=2e-6)
    part = jnp.asarray(rng.standard_normal((2, 12, 1, 16)), jnp.bfloat16)
    for start in (0, 2, 4):  # 4: clamped to 3, as dynamic_update_slice clamps
        np.testing.assert_array_equal(np.asarray(jax.jit(cpu_decode.put_rows)(cache, part, start)),
                                      np.asarray(jax.lax.dynamic_update_slice_in_dim(cache, part, start, axis=0)))
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_decode.take_rows, static_argnums=1)(cache, 3)),
                                  np.asarray(cache[:3]))


@pytest.mark.parametrize("kernels", [True, False])
def test_copy_rows_equals_indexed_rows(kernels, monkeypatch):
    """The engine's install of prefilled rows into slots: row dst[k] of the cache = row src[k] of the prefill,
    pairs with an index out of range copy nothing; the kernel and the XLA fallback agree with numpy."""
    if not kernels:
        monkeypatch.setenv("GEMMA_NO_CPU_DECODE", "1")
    rng = np.random.default_rng(2)
    cache = jnp.asarray(rng.standard_normal((6, 5, 1, 8)), jnp.bfloat16)
    part = jnp.asarray(rng.standard_normal((4, 5, 1, 8)), jnp.bfloat16)
    src, dst = np.asarray([2, 0, 3, -1, 1, 9], np.int32), np.asarray([5, 1, 0, 2, -1, 3], np.int32)
    want = np.asarray(cache).copy()
    for i, j in ((2, 5), (0, 1), (3, 0)):
        want[j] = np.asarray(part[i])
    got = jax.jit(cpu_decode.copy_rows, donate_argnums=0)(jnp.array(cache), part, src, dst)
    np.testing.assert_array_equal(np.asarray(got), want)
