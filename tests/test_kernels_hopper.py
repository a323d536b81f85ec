"""kernels.flash_hopper and flash_hopper_bwd (the Hopper forward and backward in Pallas Mosaic GPU) vs
the XLA reference.

On CPU the kernel runs in Mosaic GPU interpret mode: every warpgroup a thread, barriers, TMA copies
and wgmma simulated, so the pipeline protocol (slot refills, releases, the shared schedule barrier,
tiles with no key block at all) is exercised, not only the math. Interpret mode runs each warpgroup
as its own XLA computation; nested inside an outer jit on this 2-core CPU client they starve each
other, so the kernel runs here under jax.disable_jit. On a Hopper GPU the same tests run compiled.
The interpreter of jax < 0.11 lacks parts these kernels use (layout_cast, transposed wgmma operands),
so off a GPU these tests need jax >= 0.11 (Python >= 3.12); the CUDA lowering at production shapes is
tested in test_kernels_gpu.py on any jax. Random inputs, never zeros; bf16 / f16 atol 2e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import blocks, flash_gpu, flash_hopper, flash_hopper_bwd, reference

ON_HOPPER = flash_hopper.on_hopper()
JAX_VERSION = tuple(int(x) for x in jax.__version__.split(".")[:2])
needs_interpreter = pytest.mark.skipif(
    not ON_HOPPER and JAX_VERSION < (0, 11),
    reason=f"Mosaic GPU interpret mode of jax {jax.__version__} lacks layout_cast and transposed wgmma operands",
)


def run_eagerly(f, *args):
    if ON_HOPPER:
        return jax.jit(f)(*args)
    with jax.disable_jit():
        return f(*args)


def inputs(seed, b, t, heads, kv_heads, h, window, pad, dtype):
    """q [b, t, heads, h], k, v [b, t, kv_heads, h] and causal-window intervals; row i of batch j is
    left padding (sees nothing, is seen by nobody) when i < pad[j]."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s, np.float32).astype(dtype)
               for s in ((b, t, heads, h), (b, t, kv_heads, h), (b, t, kv_heads, h)))
    pos = np.broadcast_to(np.arange(t), (b, t))
    pad = np.asarray(pad)[:, None]
    k_start = np.maximum(pos - window + 1, pad)
    k_end = np.where(pos < pad, -1, pos)
    return q, k, v, k_start.astype(np.int32), k_end.astype(np.int32)


def ref_and_lse(q, k, v, k_start, k_end, scale):
    """Reference output (f32) and logsumexp in log2 units with the scale folded in (0 where empty)."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    out = reference.attention(q, k, v, k_start, k_end, scale=scale)
    g = q.shape[2] // k.shape[2]
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, g, axis=2)) * scale * np.log2(np.e)
    s = np.arange(k.shape[1])
    visible = (s[None, None, :] >= k_start[:, :, None]) & (s[None, None, :] <= k_end[:, :, None])
    masked = np.where(visible[:, None], logits, -np.inf)
    peak = np.max(masked, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        lse = (np.log2(np.sum(np.exp2(masked - peak), axis=-1)) + peak[..., 0])
    return np.asarray(out), np.where(visible.any(-1)[:, None], lse, 0.0)


CASES = {  # b, t, (q heads, kv heads), h, window, left padding per row, dtype, forward options
    "gqa_4_2_ragged": (2, 256, (4, 2), 64, 50, [0, 70], jnp.bfloat16, {}),
    "window_1_empty_tile": (1, 384, (2, 1), 128, 1, [200], jnp.bfloat16, {}),  # rows 0..127: no keys
    "causal_8_4_f16": (1, 256, (8, 4), 64, 1000, [0], jnp.float16, {}),  # window >= T
    "head_dim_256_odd_window": (1, 128, (2, 1), 256, 37, [3], jnp.bfloat16, {}),
    # persistent: 3 CTAs over 12 items of unequal length, one with no key block, the K/V ring running on
    "persistent_3_ctas": (2, 384, (2, 1), 64, 100, [0, 200], jnp.bfloat16, {"ctas": 3}),
    "persistent_head_dim_256": (1, 512, (2, 1), 256, 150, [0], jnp.bfloat16, {"ctas": 3}),  # the SMEM-full shape
    # paired: a warpgroup per q head of a pair (heads 0, 1 and 2, 3 of kv heads 0 and 1), 64-row tiles
    "paired_gqa_4_2_ragged": (2, 256, (4, 2), 64, 50, [0, 70], jnp.bfloat16, {"paired": True}),
    # paired and persistent, group of 4 (two pairs per kv head), rows 0..149 padding: tiles with no key
    "paired_persistent_4_1": (1, 384, (4, 1), 128, 90, [150], jnp.bfloat16, {"paired": True, "ctas": 5}),
}


@needs_interpreter
@pytest.mark.parametrize("name", CASES)
def test_forward_and_logsumexp_match_reference(name):
    b, t, (heads, kv_heads), h, window, pad, dtype, options = CASES[name]
    q, k, v, ks, ke = inputs(1, b, t, heads, kv_heads, h, window, pad, dtype)
    scale = h**-0.5
    out, lse = run_eagerly(lambda *a: flash_hopper.forward(*a, scale=scale, interpret=not ON_HOPPER, **options),
                           q, k, v, ks, ke)
    ref, ref_lse = ref_and_lse(q, k, v, ks, ke, scale)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-2, rtol=0)  # the Triton backward reads it
    assert not np.any(np.asarray(out, np.float32)[:, : min(pad)])  # padding rows are exact zeros


@needs_interpreter
def test_flash_gpu_with_hopper_forward_pads_and_differentiates():
    """flash_gpu.attention(mosaic=True): T padded to whole tiles, GQA, ragged rows; gradients through
    the Triton backward from the Hopper forward's logsumexp vs jax.grad of the reference."""
    b, t, heads, kv_heads, h, window = 2, 200, 4, 2, 64, 40
    q, k, v, ks, ke = inputs(2, b, t, heads, kv_heads, h, window, [5, 33], jnp.bfloat16)
    dout = np.random.default_rng(3).standard_normal(q.shape, np.float32)
    scale = h**-0.5

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * dout)

    ours = loss(lambda q, k, v: flash_gpu.attention(q, k, v, ks, ke, scale=scale, mosaic=True,
                                                    interpret=not ON_HOPPER))
    ref = loss(lambda q, k, v: reference.attention(q, k, v, ks, ke, scale=scale))
    out = run_eagerly(lambda *a: flash_gpu.attention(*a, ks, ke, scale=scale, mosaic=True, interpret=not ON_HOPPER),
                      q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_and_lse(q, k, v, ks, ke, scale)[0], atol=2e-2)
    grads = run_eagerly(jax.grad(ours, argnums=(0, 1, 2)), q, k, v)
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(*f32)
    for name, g, w in zip("qkv", grads, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=5e-2, rtol=0, err_msg=f"d{name}")


def assert_grads_close(got, want):
    """Per gradient: max abs error within 5e-2 of the scale of its values, and the relative error
    (norm of the difference over the norm of the reference, or over 1 where that is smaller) within
    1e-2, bf16 rounding of P, dS and the outputs being the expected error (the Triton backward's is the same)."""
    for which, g, w in zip("qkv", got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w)
        np.testing.assert_allclose(g, w, atol=5e-2 * max(1.0, np.abs(w).max() / 4), rtol=0, err_msg=f"d{which}")
        assert np.linalg.norm(g - w) <= 1e-2 * max(np.linalg.norm(w), 1.0), f"d{which}"  # (W = 1: dq is 0)


def reference_grads(q, k, v, k_start, k_end, dout, scale):
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    loss = lambda q, k, v: jnp.sum(reference.attention(q, k, v, k_start, k_end, scale=scale) * dout)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*f32)


@needs_interpreter
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if not case[-1]])
def test_backward_matches_reference_gradients(name):
    """flash_hopper_bwd.backward from the Hopper forward's output and logsumexp: dq (the forward's
    tiles, key blocks of 32), dk and dv (a key block per CTA, every q head of its group, the query
    blocks that meet it) vs jax.grad of the reference; padding rows and keys nobody sees get zeros."""
    b, t, (heads, kv_heads), h, window, pad, dtype, _ = CASES[name]
    q, k, v, ks, ke = inputs(4, b, t, heads, kv_heads, h, window, pad, dtype)
    dout = np.random.default_rng(5).standard_normal(q.shape, np.float32).astype(dtype)
    scale = h**-0.5

    def grads(q, k, v, ks, ke, dout):
        o, lse = flash_hopper.forward(q, k, v, ks, ke, scale=scale, interpret=not ON_HOPPER)
        return flash_hopper_bwd.backward(q, k, v, o, lse, dout, ks, ke, scale=scale, interpret=not ON_HOPPER)

    got = run_eagerly(grads, q, k, v, ks, ke, dout)
    assert_grads_close(got, reference_grads(q, k, v, ks, ke, np.asarray(dout, np.float32), scale))
    for row, p in enumerate(pad):  # padding rows see nothing and are seen by nobody: exact zeros
        for g in got:
            assert not np.any(np.asarray(g, np.float32)[row, :p])


@needs_interpreter
@pytest.mark.parametrize("mosaic", [True, False])
def test_flash_gpu_with_hopper_backward_pads_and_differentiates(mosaic):
    """flash_gpu.attention(mosaic_backward=True): T padded to whole tiles, GQA, ragged rows, and rows
    whose interval reaches past the last key (as an image block at the end may), which must not reach
    the padding keys; the backward by the Hopper kernels after the Hopper forward (mosaic=True) or the
    Triton one (mosaic=False: its logsumexp serves the Hopper backward too) vs the reference."""
    b, t, heads, kv_heads, h, window = 2, 200, 4, 2, 64, 40
    q, k, v, ks, ke = inputs(6, b, t, heads, kv_heads, h, window, [5, 33], jnp.bfloat16)
    ke = np.where(np.arange(t) > 150, t + 40, ke).astype(np.int32)
    dout = np.random.default_rng(7).standard_normal(q.shape, np.float32)
    scale = h**-0.5

    def attend(q, k, v):
        return flash_gpu.attention(q, k, v, ks, ke, scale=scale, mosaic=mosaic, mosaic_backward=True,
                                   interpret=not ON_HOPPER)

    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * dout)

    out = run_eagerly(attend, q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_and_lse(q, k, v, ks, ke, scale)[0], atol=2e-2)
    got = run_eagerly(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert_grads_close(got, reference_grads(q, k, v, ks, ke, dout, scale))


@needs_interpreter
def test_forward_and_backward_on_arbitrary_intervals():
    """Random per-row intervals (not monotone, some reaching past the row as image blocks do, some
    empty): the tiles' hulls have gaps and few whole blocks. Forward, logsumexp and all three gradients."""
    b, t, heads, kv_heads, h = 1, 256, 4, 2, 64
    q, k, v, _, _ = inputs(8, b, t, heads, kv_heads, h, 1, [0], jnp.bfloat16)
    rng = np.random.default_rng(9)
    ks = rng.integers(-10, t, (b, t)).astype(np.int32)
    ke = (ks + rng.integers(-20, 150, (b, t))).astype(np.int32)  # about 1 in 8 rows empty
    dout = rng.standard_normal(q.shape, np.float32).astype(jnp.bfloat16)
    scale = h**-0.5

    def run(q, k, v, ks, ke, dout):
        o, lse = flash_hopper.forward(q, k, v, ks, ke, scale=scale, interpret=not ON_HOPPER)
        return o, lse, flash_hopper_bwd.backward(q, k, v, o, lse, dout, ks, ke, scale=scale, interpret=not ON_HOPPER)

    out, lse, got = run_eagerly(run, q, k, v, ks, ke, dout)
    ref, ref_lse = ref_and_lse(q, k, v, ks, ke, scale)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-2, rtol=0)
    assert_grads_close(got, reference_grads(q, k, v, ks, ke, np.asarray(dout, np.float32), scale))


def test_serves_only_the_prefill_shape():
    q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    assert flash_hopper.serves(q, k, None, None)
    assert not flash_hopper.serves(q.astype(jnp.float32), k.astype(jnp.float32), None, None)  # f32: Triton
    assert not flash_hopper.serves(q, k, 50.0, None)  # soft-cap
    assert not flash_hopper.serves(q, k, None, jnp.zeros((1, 128), jnp.int32))  # cache positions
    assert not flash_hopper.serves(q, k[:, :64], None, None)  # S != T
    assert not flash_hopper.serves(q[..., :32], k[..., :32], None, None)  # H not a multiple of 64
    ks = ke = jnp.zeros((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="mosaic_backward=True needs"):
        flash_gpu.attention(q, k, k, jnp.zeros((1, 128), jnp.int32), jnp.zeros((1, 128), jnp.int32), scale=0.1,
                            softcap=30.0, mosaic=False, mosaic_backward=True, interpret=True)
    with pytest.raises(ValueError, match="mosaic=True needs"):
        flash_gpu.attention(q.astype(jnp.float32), k.astype(jnp.float32), k.astype(jnp.float32), ks, ke,
                            scale=0.1, mosaic=True, interpret=True)


def test_contiguous_ranges_match_the_block_tables():
    """blocks.contiguous_ranges (O(T) arithmetic, keys at 0 .. S-1) equals first_last over the [T/bq, S/bk]
    tables of blocks.hulls and blocks.inside it replaces, on random intervals: empty rows, starts below 0,
    ends past the last key, whole blocks empty, int32 extremes."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        bq, bk = (64, 64) if trial % 3 else (32, 128)
        t = int(rng.choice([256, 512]))
        ks = rng.integers(-300, t + 100, (2, t))
        ke = ks + rng.integers(-40, 400, (2, t))
        if trial % 4 == 0:  # windows, left padding, a batch of nothing but padding
            pos = np.arange(t)
            ks = np.maximum(pos - rng.integers(1, 300), 0) + 0 * ks
            ke = np.where(pos < rng.integers(0, t, (2, 1)), -1, pos)
            ke[1] = -1
        if trial % 4 == 1:  # bidirectional segments with ends on, next to and off block edges
            bounds = np.unique(np.concatenate([[0, t], rng.choice(np.arange(32, t, 32), 6) + rng.integers(-1, 2, 6)]))
            seg = np.searchsorted(bounds, np.arange(t), side="right") - 1
            ks, ke = np.tile(bounds[seg] - rng.integers(0, 2) * 64, (2, 1)), np.tile(bounds[seg + 1] - 1, (2, 1))
        if trial % 5 == 0:  # extreme ends
            ks[0, :7] = np.iinfo(np.int32).min
            ke[0, :3] = np.iinfo(np.int32).max * (trial % 2)
            ke[0, 3:bq] = np.iinfo(np.int32).max  # a whole query block but for rows 0..2
        ks, ke = jnp.asarray(ks, jnp.int32), jnp.asarray(np.clip(ke, -2**31, 2**31 - 1), jnp.int32)
        k_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
        *_, meets = blocks.hulls(ks, ke, k_pos, bq, bk)
        want = (*blocks.first_last(meets, axis=2), *blocks.first_last(blocks.inside(ks, ke, k_pos, bq, bk), axis=2))
        got = blocks.contiguous_ranges(ks, ke, bq, bk, t // bk)
        for name, g, w in zip(("first", "last", "in_first", "in_last"), got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"trial {trial}: {name}")


def test_paired_tile_meta_gives_both_warpgroups_the_tile():
    """paired: 64-row tiles, both warpgroups' hulls equal the tile's [lo, hi) (no idle block); unpaired
    128-row tiles' warpgroup rows are the paired tiles' hulls, two by two."""
    t, w = 512, 100
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    ks, ke = jnp.maximum(pos - w + 1, 0), pos
    paired = np.asarray(flash_hopper.tile_meta(ks, ke, 64, 64, paired=True))[0]
    unpaired = np.asarray(flash_hopper.tile_meta(ks, ke, 64, 64))[0]
    assert paired.shape == (10, t // 64) and unpaired.shape == (10, t // 128)
    np.testing.assert_array_equal(paired[2:6], paired[6:10])
    np.testing.assert_array_equal(paired[2], paired[0]), np.testing.assert_array_equal(paired[5], paired[1])
    np.testing.assert_array_equal(unpaired[2:6], paired[2:6, 0::2])
    np.testing.assert_array_equal(unpaired[6:10], paired[2:6, 1::2])
    with pytest.raises(ValueError, match="even number of q heads"):
        flash_hopper.forward(*(jnp.zeros((1, 128, n, 64), jnp.bfloat16) for n in (3, 1, 1)), ks[:, :128], ke[:, :128],
                             scale=0.1, paired=True, interpret=True)


def test_tile_meta_splits_the_band():
    """T = 512, W = 100, 64-row warpgroups, 64-key blocks: rows [64 h, 64 h + 63] see keys
    [64 h - 99, 64 h + 63], blocks max(h - 2, 0) .. h (h - 1 from h = 2 on: 64 h - 99 >= 64 (h - 2) + 29);
    a 128-row tile streams the union of its two warpgroups' hulls."""
    t, w = 512, 100
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    lo, hi, *own = np.asarray(flash_hopper.tile_meta(jnp.maximum(pos - w + 1, 0), pos, 64, 64))[0]
    np.testing.assert_array_equal(lo, [0, 0, 2, 4])
    np.testing.assert_array_equal(hi, [2, 4, 6, 8])
    (first0, a0, b0, end0), (first1, a1, b1, end1) = own[:4], own[4:]
    np.testing.assert_array_equal(first0, [0, 0, 2, 4])
    np.testing.assert_array_equal(end0, [1, 3, 5, 7])  # the upper warpgroup's last block is idle here
    np.testing.assert_array_equal(first1, [0, 1, 3, 5])  # and the lower one's first block there
    np.testing.assert_array_equal(end1, [2, 4, 6, 8])
    # every row of a warpgroup sees at most [64 h + 63 - 99, 64 h]: 36 keys, no whole block
    np.testing.assert_array_equal(a0, end0), np.testing.assert_array_equal(b0, end0)
    np.testing.assert_array_equal(a1, end1), np.testing.assert_array_equal(b1, end1)
    wide = np.asarray(flash_hopper.tile_meta(jnp.maximum(pos - 400 + 1, 0), pos, 64, 64))[0]
    # W = 400, rows 384..447 all see [48, 384]: blocks 1..5 whole; rows 448..511 [112, 448]: blocks 2..6
    assert tuple(wide[:, 3]) == (0, 8, 0, 1, 6, 7, 0, 2, 7, 8)
    # padding rows 0..99: the tile of rows 0..127 has an idle upper warpgroup, [lo, lo)
    ks, ke = jnp.maximum(pos - w + 1, 100), jnp.where(pos < 100, -1, pos)
    padded = np.asarray(flash_hopper.tile_meta(ks, ke, 64, 64))[0]
    assert tuple(padded[:, 0]) == (1, 2, 1, 1, 1, 1, 1, 2, 2, 2)
