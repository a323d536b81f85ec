"""The split-K decode kernel (kernels.decode, Pallas interpret mode on CPU) and the banded
XLA attention (kernels.banded) against the reference attention (kernels.reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import banded, decode, reference
from kernels.blocks import EMPTY

from conftest import spy

ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
# jit: one compilation per configuration instead of one per eager op.
decode_attention = jax.jit(decode.attention, static_argnames=(
    "scale", "softcap", "block_k", "num_splits", "num_warps", "num_stages", "interpret"))
banded_attention = jax.jit(banded.attention, static_argnames=("scale", "softcap", "window", "chunk", "lookahead"))
reference_attention = jax.jit(reference.attention, static_argnames=("scale", "softcap"))


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=ATOL[dtype], rtol=0)


# ----------------------------------------------------------------------------- decode, linear cache

@pytest.mark.parametrize("heads, kv_heads, head_dim, dtype, slots, softcap", [
    (4, 1, 64, jnp.float32, 200, None),     # slots not a multiple of block_k: masked tail loads
    (4, 1, 256, jnp.bfloat16, 192, 50.0),
    (4, 2, 128, jnp.float32, 160, 20.0),
    (8, 4, 256, jnp.bfloat16, 96, None),
])  # the ring test below adds (8, 4) with head_dim 64 in both dtypes
def test_decode_linear_cache_matches_reference(heads, kv_heads, head_dim, dtype, slots, softcap):
    """Ragged rows of a linear cache whose unused tail is NaN; one row has an empty interval."""
    b = 4
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(heads * 1000 + head_dim + slots), 3)
    lengths = np.array([slots, 37, 90, 5])
    filled = np.arange(slots)[None, :] < lengths[:, None]  # [B, S]
    nan = jnp.asarray(~filled)[:, :, None, None]
    k = jnp.where(nan, jnp.nan, _normal(kk, (b, slots, kv_heads, head_dim), dtype)).astype(dtype)
    v = jnp.where(nan, jnp.nan, _normal(kv, (b, slots, kv_heads, head_dim), dtype)).astype(dtype)
    q = _normal(kq, (b, 1, heads, head_dim), dtype)
    k_pos = jnp.asarray(np.where(filled, np.arange(slots)[None, :], EMPTY), jnp.int32)
    k_start = jnp.asarray([[0], [3], [40], [9]], jnp.int32)  # row 3: 9 > its last position 4 -> empty
    k_end = jnp.asarray(lengths[:, None] - 1, jnp.int32)
    kw = dict(scale=head_dim ** -0.5, softcap=softcap, k_pos=k_pos)
    out = decode_attention(q, k, v, k_start, k_end, block_k=32, num_splits=3, interpret=True, **kw)
    # The oracle on the filled keys only (the NaN tail would poison its masked matmul).
    finite = lambda x: jnp.where(nan, 0, x).astype(dtype)
    ref = reference_attention(q, finite(k), finite(v), k_start, k_end, **kw)
    _assert_close(out, ref, dtype)
    assert np.all(np.asarray(out[3]) == 0)


def test_decode_default_positions_and_one_split():
    """k_pos defaults to arange(S); one split and a block bigger than the cache."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(7), 3)
    q, k, v = _normal(kq, (2, 1, 4, 64), jnp.float32), _normal(kk, (2, 40, 2, 64), jnp.float32), \
        _normal(kv, (2, 40, 2, 64), jnp.float32)
    k_start, k_end = jnp.asarray([[0], [12]]), jnp.asarray([[39], [30]])
    out = decode_attention(q, k, v, k_start, k_end, scale=0.125, block_k=64, num_splits=1, interpret=True)
    _assert_close(out, reference_attention(q, k, v, k_start, k_end, scale=0.125), jnp.float32)


def test_decode_step_is_differentiable_and_any_head_dim_is_served(monkeypatch):
    """pallas_gpu's decode step (the split-K kernel forward) differentiates through the flash kernel's
    backward, equal to the reference's gradients, with NaN in the cache's unused slots (whose gradients
    are exactly zero); a head_dim the decode kernel does not take (not a power of two) runs on the flash
    kernel, forward and backward."""
    import kernels
    from kernels import flash_gpu

    calls = []
    for module in (decode, flash_gpu):
        spy(monkeypatch, module, "attention", calls, lambda kw, name=module.__name__.split(".")[-1]: name)
    rng = np.random.default_rng(3)
    b, s, n, kv = 2, 40, 4, 2
    for h, route in ((64, ["decode", "flash_gpu"]), (48, ["flash_gpu"])):
        q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.float32)
        k_pos = np.stack([rng.permutation(s) for _ in range(b)]) - 6  # 6 unused slots per row
        unused = np.broadcast_to((k_pos < 0)[..., None, None], (b, s, kv, h))
        k_pos = jnp.asarray(np.where(k_pos < 0, EMPTY, k_pos), jnp.int32)
        k, v = (np.where(unused, 0, rng.standard_normal((b, s, kv, h))).astype(np.float32) for _ in range(2))
        k_end = jnp.asarray([[33], [20]], jnp.int32)
        dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

        def loss(impl):
            return lambda q, k, v: jnp.sum(kernels.attention(q, k, v, k_end - 11, k_end, k_pos=k_pos, impl=impl) * dout)

        with jax.default_matmul_precision("highest"):
            want = jax.grad(loss("xla"), (0, 1, 2))(q, jnp.asarray(k), jnp.asarray(v))
        calls.clear()
        poisoned = (jnp.asarray(np.where(unused, np.nan, x)) for x in (k, v))
        got = jax.grad(loss("pallas_gpu"), (0, 1, 2))(q, *poisoned)
        assert calls == route, calls
        for name, g, w in zip("qkv", got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=0, err_msg=f"d{name}, h={h}")


def test_decode_rejects_several_queries():
    q = jnp.ones((1, 2, 4, 64))
    k = jnp.ones((1, 32, 1, 64))
    with pytest.raises(ValueError, match="one query per row"):
        decode.attention(q, k, k, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), scale=1.0)


def test_decode_reads_only_live_blocks():
    """A 32K-slot cache holding 1000 tokens: the splits cover exactly the 16 blocks of 64 that hold them."""
    slots, block_k, splits = 32768, 64, 16
    lengths = jnp.asarray([1000, 32768, 1])
    pos = jnp.where(jnp.arange(slots)[None] < lengths[:, None], jnp.arange(slots)[None], EMPTY)
    visible = (pos >= 0) & (pos <= lengths[:, None] - 1)
    first, end = decode._split_ranges(visible, block_k, splits)
    np.testing.assert_array_equal(np.sum(end - first, axis=1), [16, 512, 1])
    assert int(jnp.max(end - first)) == 32  # the full row is spread evenly: 512 blocks / 16 splits
    assert np.all(np.asarray(first[:, 1:]) >= np.asarray(end[:, :-1]))  # splits do not overlap


# ----------------------------------------------------------------------------- decode, ring cache

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_ring_after_wraparound_equals_full_history(dtype):
    """Positions 0..P-1 written to slot p mod W (P > 2W), unused slots NaN; the windowed query
    over the W-slot ring equals the reference over the whole history of P keys."""
    from gemma.cache import LayerCache

    b, w, kv_heads, heads, head_dim = 3, 32, 4, 8, 64
    lengths = np.array([83, 70, 20])  # rows 0-1 wrapped more than twice, row 2 never wrapped
    p = int(lengths.max())
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(11), 3)
    k_full = _normal(kk, (b, p, kv_heads, head_dim), dtype)
    v_full = _normal(kv, (b, p, kv_heads, head_dim), dtype)
    q = _normal(kq, (b, 1, heads, head_dim), dtype)
    ring = LayerCache(jnp.full((b, w, kv_heads, head_dim), jnp.nan, dtype),
                      jnp.full((b, w, kv_heads, head_dim), jnp.nan, dtype), ring=True)
    for start in range(0, p, 13):  # decode-like: several writes in order
        positions = np.arange(start, min(start + 13, p))[None, :].repeat(b, 0)
        positions = np.where(positions < lengths[:, None], positions, -1)
        ring = ring.write(k_full[:, positions[0]], v_full[:, positions[0]], jnp.asarray(positions))
    k_pos = ring.slot_positions(jnp.asarray(lengths, jnp.int32))
    assert np.isnan(np.asarray(ring.k[2, 25], np.float32)).all()  # row 2 keeps NaN slots
    last = jnp.asarray(lengths[:, None] - 1, jnp.int32)
    k_start, k_end = last - w + 1, last  # the window: W keys, the query's own included
    out = decode_attention(q, ring.k, ring.v, k_start, k_end, scale=0.1, k_pos=k_pos, block_k=16,
                           num_splits=2, interpret=True)
    ref = reference_attention(q, k_full, v_full, k_start, k_end, scale=0.1)
    _assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------- decode, GPU lowering

def test_decode_lowers_for_cuda_at_production_shapes(lower_for_h200):
    """Triton lowering on this CPU-only machine, through an abstract H200: B=8, N=8, K=4, H=256, bf16,
    a 32768-slot global cache, a 1024-slot ring and a ragged 1000-slot cache."""
    b, n, kv_heads, h = 8, 8, 4, 256
    f = lambda q, k, v, s, e, p: decode.attention(q, k, v, s, e, scale=h ** -0.5, k_pos=p)  # noqa: E731
    for slots in (32768, 1024, 1000):
        args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in [
            ((b, 1, n, h), jnp.bfloat16), ((b, slots, kv_heads, h), jnp.bfloat16),
            ((b, slots, kv_heads, h), jnp.bfloat16), ((b, 1), jnp.int32), ((b, 1), jnp.int32),
            ((b, slots), jnp.int32)]]
        assert lower_for_h200(f, *args).count("__gpu$xla.gpu.triton") == 1


# ----------------------------------------------------------------------------- banded prefill

def _window_intervals(b, t, window, pad):
    """Causal sliding-window intervals with `pad[i]` left-padding rows (empty intervals) in row i."""
    pos = np.arange(t)[None, :].repeat(b, 0)
    first_real = np.asarray(pad)[:, None]
    k_start = np.maximum(pos - window + 1, first_real)
    k_end = pos.copy()
    k_start[pos < first_real], k_end[pos < first_real] = 1, 0
    return jnp.asarray(k_start, jnp.int32), jnp.asarray(k_end, jnp.int32)


def _qkv(seed, b, t, heads, kv_heads, h, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (_normal(kq, (b, t, heads, h), dtype), _normal(kk, (b, t, kv_heads, h), dtype),
            _normal(kv, (b, t, kv_heads, h), dtype))


@pytest.mark.parametrize("window, t, chunk, heads, kv_heads, softcap", [
    (1, 64, None, 4, 1, None),
    (7, 150, 32, 4, 2, None),
    (16, 333, None, 8, 4, 30.0),
    (100, 600, 128, 4, 1, None),
    (100, 257, 64, 4, 2, None),  # the window reaches two chunks back
])
def test_banded_window_matches_reference(window, t, chunk, heads, kv_heads, softcap):
    b = 2
    q, k, v = _qkv(window + t, b, t, heads, kv_heads, 32)
    k_start, k_end = _window_intervals(b, t, window, pad=[0, 5])
    kw = dict(scale=32 ** -0.5, softcap=softcap)
    out = banded_attention(q, k, v, k_start, k_end, window=window, chunk=chunk, **kw)
    _assert_close(out, reference_attention(q, k, v, k_start, k_end, **kw), jnp.float32)
    assert np.all(np.asarray(out[1, :5]) == 0)  # padding rows


def test_banded_bidirectional_image_block_with_lookahead():
    """Tokens of an image block see the whole block (keys ahead of them): lookahead = block length - 1."""
    b, t, window, image = 2, 300, 50, (130, 194)  # a 64-token image, longer than its chunk
    q, k, v = _qkv(3, b, t, 4, 2, 64)
    k_start, k_end = _window_intervals(b, t, window, pad=[0, 17])
    pos = np.arange(t)
    in_image = (pos >= image[0]) & (pos < image[1])
    k_start = jnp.where(in_image, jnp.minimum(k_start, image[0]), k_start)
    k_end = jnp.where(in_image, image[1] - 1, k_end)
    lookahead = image[1] - 1 - image[0]
    ref = reference_attention(q, k, v, k_start, k_end, scale=0.125)
    for chunk in (None, 32):
        out = banded_attention(q, k, v, k_start, k_end, scale=0.125, window=window, chunk=chunk,
                               lookahead=lookahead)
        _assert_close(out, ref, jnp.float32)


def _avals(jaxpr):
    """Every intermediate value's abstract shape in a jaxpr, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        yield from (var.aval for var in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _avals(sub)


def test_banded_holds_no_full_score_matrix():
    """T=4096, W=512: no value of the traced computation has T*T entries per (row, head);
    the largest is one chunk's scores against its band."""
    b, t, heads, kv_heads, h, window = 1, 4096, 4, 1, 64, 512
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(b, t, heads, h), (b, t, kv_heads, h), (b, t, kv_heads, h)]]
    bounds = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2
    f = lambda q, k, v, s, e: banded.attention(q, k, v, s, e, scale=0.125, window=window)
    jaxpr = jax.make_jaxpr(f)(*args, *bounds).jaxpr
    sizes = [int(np.prod(a.shape)) for a in _avals(jaxpr) if hasattr(a, "shape")]
    chunk = banded.default_chunk(window, t)
    band_scores = b * heads * t * 2 * chunk  # each query against its chunk and the one before
    assert max(sizes) == band_scores
    assert max(sizes) <= b * heads * t * t // 4
    full = jax.make_jaxpr(lambda q, k, v, s, e: reference.attention(q, k, v, s, e, scale=0.125))(*args, *bounds)
    assert max(int(np.prod(a.shape)) for a in _avals(full.jaxpr) if hasattr(a, "shape")) == b * heads * t * t
