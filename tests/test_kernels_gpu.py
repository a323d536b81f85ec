"""Pallas GPU (Triton) flash attention vs the XLA reference.

On a machine without a GPU the kernels run with interpret=True (CPU); on a GPU they run
compiled. Random inputs, never zeros. Tolerances: f32 atol 2e-5, bf16 atol 2e-2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import flash_gpu, flash_hopper, reference

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
EMPTY = flash_gpu.EMPTY


# ----------------------------------------------------------------------------- interval builders


def sliding(pos, window):
    """pos int [B, T] query positions -> causal window intervals: pos - W < key <= pos."""
    return pos - window + 1, pos


def with_images(k_start, k_end, pos, images):
    """Each (b, first, last) image span is bidirectional: its queries see the whole span."""
    k_start, k_end = np.array(k_start), np.array(k_end)
    for b, first, last in images:
        inside = (pos[b] >= first) & (pos[b] <= last)
        k_start[b] = np.where(inside, np.minimum(k_start[b], first), k_start[b])
        k_end[b] = np.where(inside, last, k_end[b])
    return k_start, k_end


def ring_cache(b, slots, filled, t):
    """k_pos [b, slots + t]: a ring of `slots` slots (slot = pos % slots) holding the last
    min(filled, slots) of `filled` earlier positions, unused slots at EMPTY, then the t new
    keys at positions filled .. filled + t - 1. Returns (k_pos, query positions [b, t])."""
    k_pos = np.full((b, slots + t), EMPTY, np.int64)
    q_pos = np.zeros((b, t), np.int64)
    for i in range(b):
        n = filled[i]
        for p in range(max(0, n - slots), n):
            k_pos[i, p % slots] = p
        k_pos[i, slots:] = n + np.arange(t)
        q_pos[i] = n + np.arange(t)
    return k_pos, q_pos


# ----------------------------------------------------------------------------- helpers


def random_qkv(seed, b, t, s, heads, kv_heads, h, dtype):
    """Standard-normal q [b, t, heads, h], k, v [b, s, kv_heads, h] as numpy arrays of `dtype`."""
    rng = np.random.default_rng(seed)
    return tuple(
        rng.standard_normal(shape, np.float32).astype(dtype)
        for shape in ((b, t, heads, h), (b, s, kv_heads, h), (b, s, kv_heads, h))
    )


def poison(x, k_pos):
    """x [B, S, K, H] with NaN in the unused slots (k_pos == EMPTY)."""
    return np.where((k_pos == EMPTY)[:, :, None, None], np.nan, x).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "softcap"))
def ref_attention(q, k, v, ks, ke, **kw):
    with jax.default_matmul_precision("highest"):
        return reference.attention(q, k, v, ks, ke, **kw)


block_meta = jax.jit(flash_gpu.block_meta, static_argnums=(3, 4))


def flash(q, k, v, ks, ke, *, bq, bk, **kw):
    return flash_gpu.attention(q, k, v, ks, ke, block_q=bq, block_k=bk, interpret=INTERPRET, **kw)


def i32(*xs):
    return [np.asarray(x, np.int32) for x in xs]


def case_inputs(c):
    """Builds (q, k, v, k_start, k_end, k_pos or None, clean k, clean v) for a case dict."""
    b, t, heads, kv_heads, h, dtype = c["b"], c["t"], c["heads"], c["kv_heads"], c["h"], c["dtype"]
    k_pos = None
    kind = c["kind"]
    if kind == "window":  # queries at positions offset .. offset + t - 1 over keys 0 .. s - 1
        s = c.get("s", t)
        pos = np.broadcast_to(s - t + np.arange(t), (b, t))
        ks, ke = sliding(pos, c["window"])
    elif kind == "images":
        s = t
        pos = np.broadcast_to(np.arange(t), (b, t))
        ks, ke = with_images(*sliding(pos, c["window"]), pos, c["images"])
    elif kind == "ragged":  # per-sequence lengths: rows past the length see nothing, keys past it are never seen
        s = t
        pos = np.broadcast_to(np.arange(t), (b, t))
        ks, ke = sliding(pos, c["window"])
        lengths = np.asarray(c["lengths"])[:, None]
        ks = np.where(pos < lengths, ks, 1)
        ke = np.where(pos < lengths, np.minimum(ke, lengths - 1), 0)
    elif kind == "ring":  # ring cache (unused slots NaN-poisoned) plus the chunk's own keys
        k_pos, pos = ring_cache(b, c["slots"], c["filled"], t)
        s = k_pos.shape[1]
        ks, ke = sliding(pos, c["window"])
    else:
        raise ValueError(kind)
    q, k, v = random_qkv(c["seed"], b, t, s, heads, kv_heads, h, dtype)
    ks, ke = i32(ks, ke)
    if k_pos is not None:
        (k_pos,) = i32(k_pos)
        return q, poison(k, k_pos), poison(v, k_pos), ks, ke, k_pos, k, v
    return q, k, v, ks, ke, None, k, v


F32, BF16 = jnp.float32, jnp.bfloat16
# Forward only (bf16 and f32).
FWD_CASES = {
    "window1_gqa41_h64": dict(kind="window", b=1, t=75, heads=4, kv_heads=1, h=64, dtype=F32, window=1, bq=32, bk=16),
    "window5_gqa42_h128_bf16": dict(kind="window", b=2, t=100, heads=4, kv_heads=2, h=128, dtype=BF16, window=5, bq=16, bk=32),
    "window17_gqa84_h256": dict(kind="window", b=1, t=70, heads=8, kv_heads=4, h=256, dtype=F32, window=17, bq=32, bk=32),
    "causal_window_ge_T_h256_bf16": dict(kind="window", b=1, t=130, heads=4, kv_heads=1, h=256, dtype=BF16, window=300, bq=64, bk=32),
    "chunk_T_lt_S_bf16": dict(kind="window", b=2, t=24, s=124, heads=4, kv_heads=2, h=64, dtype=BF16, window=40, bq=16, bk=32),
    "ragged_lengths": dict(kind="ragged", b=3, t=60, heads=8, kv_heads=4, h=64, dtype=F32, window=1000,
                           lengths=[60, 33, 1], bq=16, bk=32),
    "window100_inside_blocks_bf16": dict(kind="window", b=1, t=160, heads=4, kv_heads=2, h=64, dtype=BF16, window=100,
                                         bq=16, bk=16),
    "ring_nan_kpos_bf16": dict(kind="ring", b=2, t=20, heads=4, kv_heads=2, h=64, dtype=BF16, window=32, slots=32,
                               filled=[50, 5], bq=16, bk=32),
}
# Forward and backward (f32).
GRAD_CASES = {
    "window7_gqa42_bq_gt_bk": dict(kind="window", b=2, t=70, heads=4, kv_heads=2, h=64, dtype=F32, window=7, bq=32, bk=16),
    "images_bidirectional_bq_lt_bk": dict(kind="images", b=2, t=96, heads=4, kv_heads=2, h=64, dtype=F32, window=16,
                                          images=[(0, 10, 29), (0, 40, 71), (1, 3, 60)], bq=16, bk=32),
    "ring_nan_kpos_h128": dict(kind="ring", b=2, t=20, heads=4, kv_heads=1, h=128, dtype=F32, window=48, slots=48,
                               filled=[75, 13], bq=16, bk=16),
    "causal_inside_blocks_softcap": dict(kind="window", b=1, t=80, heads=4, kv_heads=2, h=64, dtype=F32, window=1000,
                                         softcap=3.0, bq=16, bk=16),
    "softcap_window9_gqa84": dict(kind="window", b=1, t=50, heads=8, kv_heads=4, h=64, dtype=F32, window=9, softcap=2.0,
                                  bq=16, bk=16),
}
for i, c in enumerate([*FWD_CASES.values(), *GRAD_CASES.values()]):
    c["seed"] = i


def tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == F32 else dict(atol=2e-2, rtol=0)


def assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"NaN/inf leaked into {what}"
    np.testing.assert_allclose(got, want, err_msg=what, **tol(dtype))


@pytest.mark.parametrize("name", list(FWD_CASES))
def test_forward_matches_reference(name):
    c = FWD_CASES[name]
    q, k, v, ks, ke, k_pos, k_clean, v_clean = case_inputs(c)
    kw = dict(scale=c["h"] ** -0.5, softcap=c.get("softcap"), k_pos=k_pos)
    out = flash(q, k, v, ks, ke, bq=c["bq"], bk=c["bk"], **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref_attention(q, k_clean, v_clean, ks, ke, **kw), c["dtype"], "output")
    if c["kind"] == "ragged":  # rows past a sequence's length are exactly zero
        assert np.abs(np.asarray(out[2, 1:], np.float32)).max() == 0.0


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_forward_and_gradients_match_reference(name):
    """Output and custom_vjp gradients (Pallas dq and dk/dv kernels) vs jax.vjp of the reference, f32.
    NaN-poisoned unused slots: finite everywhere, and exactly zero gradient at those slots."""
    c = GRAD_CASES[name]
    q, k, v, ks, ke, k_pos, k_clean, v_clean = case_inputs(c)
    kw = dict(scale=c["h"] ** -0.5, softcap=c.get("softcap"), k_pos=k_pos)
    w = np.random.default_rng(99).standard_normal(q.shape, np.float32)  # a random cotangent

    @jax.jit
    def flash_vjp(q, k, v):
        out, pullback = jax.vjp(lambda *a: flash(*a, ks, ke, bq=c["bq"], bk=c["bk"], **kw), q, k, v)
        return out, pullback(w)

    @jax.jit
    def ref_vjp(q, k, v):
        out, pullback = jax.vjp(lambda *a: ref_attention(*a, ks, ke, **kw), q, k, v)
        return out, pullback(w)

    out, grads = flash_vjp(q, k, v)
    want_out, want_grads = ref_vjp(q, k_clean, v_clean)
    assert_close(out, want_out, F32, "output")
    for what, g, r in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(g, r, F32, what)
    if k_pos is not None:
        unused = k_pos == EMPTY
        assert unused.any()
        assert np.abs(np.asarray(grads[1])[unused]).max() == 0.0
        assert np.abs(np.asarray(grads[2])[unused]).max() == 0.0


def test_block_meta_visits_only_the_window():
    """Block skipping: with a causal window each query block's key-block loop covers exactly the
    blocks its rows can see, and each key block's query-block loop the blocks that see it."""
    t, window, bq, bk = 256, 40, 32, 16
    pos = np.arange(t, dtype=np.int32)[None]
    ks, ke = sliding(pos, window)
    qmeta, kmeta = block_meta(ks, ke, pos, bq, bk)
    i = np.arange(t // bq)
    np.testing.assert_array_equal(qmeta[0, 0], i * bq - window + 1)  # lo
    np.testing.assert_array_equal(qmeta[0, 1], i * bq + bq - 1)  # hi
    np.testing.assert_array_equal(qmeta[0, 2], np.maximum(0, (i * bq - window + 1) // bk))  # first key block
    np.testing.assert_array_equal(qmeta[0, 3], (i * bq + bq - 1) // bk)  # last key block
    # blocks every row sees whole (visited without a mask): keys >= the last row's window start,
    # <= the first row's position
    in_first = -(-np.maximum(0, i * bq + bq - window) // bk)
    in_last = (i * bq + 1) // bk - 1
    has = in_first <= in_last
    np.testing.assert_array_equal(qmeta[0, 4], np.where(has, in_first, 0))
    np.testing.assert_array_equal(qmeta[0, 5], np.where(has, in_last, -1))
    j = np.arange(t // bk)
    np.testing.assert_array_equal(kmeta[0, 2], j * bk // bq)  # first query block that sees key block j
    np.testing.assert_array_equal(kmeta[0, 3], np.minimum(t // bq - 1, (j * bk + bk - 1 + window - 1) // bq))


@pytest.mark.parametrize("name", ["window100_inside_blocks_bf16", "causal_inside_blocks_softcap"])
def test_cases_visit_blocks_without_a_mask(name):
    """These cases exercise the unmasked loop (blocks every row sees whole) of the forward and dq kernels."""
    c = {**FWD_CASES, **GRAD_CASES}[name]
    _, _, _, ks, ke, _, _, _ = case_inputs(c)
    pos = np.broadcast_to(np.arange(ks.shape[1], dtype=np.int32), ks.shape)
    qmeta, _ = block_meta(ks, ke, pos, c["bq"], c["bk"])
    assert int(np.sum(np.maximum(0, qmeta[:, 5] - qmeta[:, 4] + 1))) >= 10


def test_block_meta_ignores_unused_slots():
    k_pos = np.asarray([[5, EMPTY, 7, 6, EMPTY, EMPTY, EMPTY, EMPTY]], np.int32)
    ks, ke = i32([[0, 0]], [[6, -1]])  # second query row empty
    qmeta, kmeta = block_meta(ks, ke, k_pos, 2, 4)
    np.testing.assert_array_equal(qmeta[0, :, 0], [0, 6, 0, 0, 0, -1])  # an empty row: no block is inside
    np.testing.assert_array_equal(kmeta[0, 0], [5, 2**31 - 1])  # kmin; the all-empty block has none
    np.testing.assert_array_equal(kmeta[0, 2:, 0], [0, 0])
    np.testing.assert_array_equal(kmeta[0, 2:, 1], [0, -1])  # empty loop


def test_rejects_bad_block_size():
    q, k, v = random_qkv(0, 1, 16, 16, 2, 1, 64, F32)
    ks, ke = i32(np.zeros((1, 16)), np.arange(16)[None])
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        flash_gpu.attention(q, k, v, ks, ke, scale=0.1, block_q=48, interpret=True)


# ----------------------------------------------------------------------------- lowering for CUDA (no GPU needed)

PRODUCTION = [(32768, 1024), (8192, 1024)]


@pytest.mark.parametrize("mosaic", [False, True])
@pytest.mark.parametrize("t,window", PRODUCTION)
def test_lowers_for_cuda_at_production_shapes(t, window, mosaic, lower_for_h200):
    """Forward and backward lower for an H200 at B=1, N=8, K=4, H=256, bf16: Triton custom calls, or with
    mosaic=True the Hopper forward (a Mosaic GPU custom call) and the Triton backward.

    Lowering (Pallas -> Triton IR) needs no GPU when an abstract GPU device is named; PTX
    compilation happens later on the GPU itself, so this does not prove Triton compiles it."""
    b, n, kv_heads, h = 1, 8, 4, 256
    sds = jax.ShapeDtypeStruct
    q = sds((b, t, n, h), jnp.bfloat16)
    kv = sds((b, t, kv_heads, h), jnp.bfloat16)
    rows = sds((b, t), jnp.int32)

    def fwd(q, k, v, ks, ke):
        return flash_gpu.attention(q, k, v, ks, ke, scale=h**-0.5, mosaic=mosaic, mosaic_backward=False)

    def grads(q, k, v, ks, ke):
        return jax.grad(lambda *a: fwd(*a, ks, ke).astype(jnp.float32).sum(), (0, 1, 2))(q, k, v)

    fwd_hlo = lower_for_h200(fwd, q, kv, kv, rows, rows)
    bwd_hlo = lower_for_h200(grads, q, kv, kv, rows, rows)
    assert fwd_hlo.count("__gpu$xla.gpu.triton") == (0 if mosaic else 1)
    assert bwd_hlo.count("__gpu$xla.gpu.triton") == (2 if mosaic else 3)  # forward, dq, dk/dv
    assert fwd_hlo.count("@mosaic_gpu") == bwd_hlo.count("@mosaic_gpu") == (1 if mosaic else 0)
    assert f"{t}x{t}" not in fwd_hlo + bwd_hlo, "a T x S array was materialized"


@pytest.mark.parametrize("t,h,dtype", [(32768, 256, jnp.bfloat16), (8192, 256, jnp.bfloat16),
                                       (1024, 128, jnp.float16), (1024, 64, jnp.bfloat16)])
def test_hopper_backward_lowers_for_cuda_at_production_shapes(t, h, dtype, lower_for_h200):
    """mosaic_backward=True at B=1, N=8, K=4 (Gemma 3's H = 256 at 8K and 32K; H = 128 and 64 for the
    other tilings): the gradient is three Mosaic GPU calls (the forward, dq, dk/dv), no Triton, each
    within the 227 KB of shared memory and the wgmma tiling rules Mosaic GPU checks while lowering."""
    b, n, kv_heads = 1, 8, 4
    sds = jax.ShapeDtypeStruct
    q, kv, rows = sds((b, t, n, h), dtype), sds((b, t, kv_heads, h), dtype), sds((b, t), jnp.int32)

    def grads(q, k, v, ks, ke):
        loss = lambda *a: flash_gpu.attention(*a, ks, ke, scale=h**-0.5, mosaic=True,  # noqa: E731
                                              mosaic_backward=True).astype(jnp.float32).sum()
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    hlo = lower_for_h200(grads, q, kv, kv, rows, rows)
    assert hlo.count("@mosaic_gpu") == 3 and "__gpu$xla.gpu.triton" not in hlo
    assert f"{t}x{t}" not in hlo, "a T x S array was materialized"


@pytest.mark.parametrize("dtype,mosaic_backward,want_mosaic,want_triton", [
    (jnp.bfloat16, None, 3, 0),  # the default on a Hopper GPU: the Hopper forward, dq and dk/dv
    (jnp.bfloat16, False, 1, 2),  # the Hopper forward, Triton's dq and dk/dv
    (jnp.float32, None, 0, 3),  # f32: no wgmma kernel serves it, Triton throughout
])
def test_hopper_gpu_defaults_to_the_hopper_backward(monkeypatch, lower_for_h200, dtype, mosaic_backward, want_mosaic,
                                                   want_triton):
    """On a Hopper GPU (faked: flash_hopper.compute_capability() is 9.0 while lowering for an abstract H200)
    flash_gpu.attention's gradient runs the Hopper backward by default where the Hopper forward serves."""
    monkeypatch.setattr(flash_hopper, "compute_capability", lambda: 9.0)
    b, t, n, kv_heads, h = 1, 1024, 8, 4, 256
    sds = jax.ShapeDtypeStruct
    q, kv, rows = sds((b, t, n, h), dtype), sds((b, t, kv_heads, h), dtype), sds((b, t), jnp.int32)

    def grads(q, k, v, ks, ke):
        loss = lambda *a: flash_gpu.attention(*a, ks, ke, scale=h**-0.5,  # noqa: E731
                                              mosaic_backward=mosaic_backward).astype(jnp.float32).sum()
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    hlo = lower_for_h200(grads, q, kv, kv, rows, rows)
    assert (hlo.count("@mosaic_gpu"), hlo.count("__gpu$xla.gpu.triton")) == (want_mosaic, want_triton)


@pytest.mark.parametrize("paired", [False, True])
def test_persistent_hopper_forward_lowers_within_shared_memory(paired, lower_for_h200):
    """The persistent Hopper forward (one CTA per SM of an H200) at H = 256 keeps a second O buffer
    beside Q and the K/V ring: 224 KB. Mosaic GPU checks the 227 KB bound while lowering. Also with
    paired tiles (two q heads per tile), which index Q, O and the logsumexp by warpgroup."""
    b, t, n, kv_heads, h = 1, 32768, 8, 4, 256
    sds = jax.ShapeDtypeStruct
    q, kv, rows = sds((b, t, n, h), jnp.bfloat16), sds((b, t, kv_heads, h), jnp.bfloat16), sds((b, t), jnp.int32)
    fwd = functools.partial(flash_hopper.forward, scale=h**-0.5, ctas=132, paired=paired)
    hlo = lower_for_h200(fwd, q, kv, kv, rows, rows)
    assert hlo.count("@mosaic_gpu") == 1


def test_default_block_fits_the_f32_backward():
    """64 x 64 blocks, but 32 where a [64, H] tile takes 64 KB: on an H200 the f32 backward at H = 256
    asked for 272 KB of shared memory (227 KB available) at 64 x 64."""
    assert flash_gpu.default_block(256, 2) == 64  # bf16 at Gemma 3's head_dim
    assert flash_gpu.default_block(128, 4) == 64
    assert flash_gpu.default_block(256, 4) == 32
