"""Pallas TPU flash attention (kernels/flash_tpu.py) against the XLA reference.

Kernels run in TPU interpret mode on CPU (tiny shapes); production shapes are only
lowered for TPU (`.lower(lowering_platforms=("tpu",))`), which checks block shapes,
scalar prefetch and the Mosaic lowering of every op without a TPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels import flash_tpu, reference

EMPTY = flash_tpu.EMPTY_POS
# random_seed shuffles the order of the "parallel" grid axes, as megacore or a reordering would.
INTERPRET = pltpu.InterpretParams(dma_execution_mode="eager", random_seed=0)
ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@functools.lru_cache(maxsize=None)
def _kernel_fn(scale, softcap, block_q, block_k):
    """One jitted kernel per static config, so every mask below reuses its compilation."""
    return jax.jit(
        functools.partial(
            flash_tpu.attention, scale=scale, softcap=softcap, block_q=block_q, block_k=block_k, interpret=INTERPRET
        )
    )


@functools.lru_cache(maxsize=None)
def _reference_fn(scale, softcap):
    return jax.jit(functools.partial(reference.attention, scale=scale, softcap=softcap))


def _qkv(seed, b, t, s, n, kv, h, dtype):
    kq, kk, kv_ = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, kv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv_, (b, s, kv, h), jnp.float32).astype(dtype)
    return q, k, v


# ----------------------------------------------------------------------------- masks as intervals
# Queries sit at the last T of S positions (a prefill chunk after a cache), keys at 0..S-1.


def _window(b, t, s, w):
    pos = np.arange(s - t, s)
    start = np.broadcast_to(pos - w + 1, (b, t))
    end = np.broadcast_to(pos, (b, t))
    return start, end, np.broadcast_to(np.arange(s), (b, s))


def _images(b, t, s, spans):
    """Causal plus bidirectional attention inside each image span [a, z] (positions)."""
    start, end, k_pos = _window(b, t, s, s)
    pos = np.arange(s - t, s)
    end = end.copy()
    for a, z in spans:
        inside = (pos >= a) & (pos <= z)
        end[:, inside] = z
    return start, end, k_pos


def _ragged(b, t, s, lengths):
    """Causal with row-wise padding: batch row i holds lengths[i] tokens; queries past it are empty."""
    start, end, k_pos = _window(b, t, s, s)
    start, end = start.copy(), end.copy()
    pos = np.arange(s - t, s)
    for i, n in enumerate(lengths):
        start[i, pos >= n], end[i, pos >= n] = 1, 0
    return start, end, k_pos


def _ring(b, t, s, w, empty):
    """A ring cache of S slots (slot = pos mod S) after `s + 40` tokens, with `empty` never-written slots."""
    total = s + 40
    slot_pos = np.arange(total - s, total)  # the last S positions, held in slot pos % S
    k_pos = np.empty(s, np.int64)
    k_pos[slot_pos % s] = slot_pos
    k_pos[np.random.default_rng(0).choice(s, empty, replace=False)] = EMPTY
    pos = np.arange(total - t, total)
    start = np.broadcast_to(pos - w + 1, (b, t))
    end = np.broadcast_to(pos, (b, t))
    return start, end, np.broadcast_to(k_pos, (b, s))


def _poison(k, v, k_pos):
    """K/V of empty slots set to NaN (what the kernel sees) and to 0 (what the reference sees)."""
    empty = jnp.asarray(k_pos <= EMPTY)[:, :, None, None]
    nan = lambda x: jnp.where(empty, jnp.nan, x)
    zero = lambda x: jnp.where(empty, 0, x)
    return (nan(k), nan(v)), (zero(k), zero(v))


def _i32(*xs):
    return tuple(jnp.asarray(np.ascontiguousarray(x), jnp.int32) for x in xs)


# ----------------------------------------------------------------------------- forward

B, T, S, N, KV, H = 2, 70, 300, 4, 2, 128  # 3 query blocks of 32, 3 key blocks of 128 (padded)
MASKS = {
    "window1": lambda: _window(B, T, S, 1),
    "window5": lambda: _window(B, T, S, 5),
    "window37_odd": lambda: _window(B, T, S, 37),
    "window_ge_T": lambda: _window(B, T, S, 250),
    # Per-row windows: row 1 makes the walk 3 blocks long, so row 0's shorter walks repeat a block.
    "windows_37_and_250": lambda: tuple(np.concatenate([_window(1, T, S, 37)[n], _window(1, T, S, 250)[n]])
                                        for n in range(3)),
    "images": lambda: _images(B, T, S, [(235, 250), (262, 290)]),
    "ring_poisoned": lambda: _ring(B, T, S, 64, empty=30),
}


@pytest.mark.parametrize("mask", MASKS)
def test_forward_masks_f32(mask):
    """f32, GQA (4, 2), T/S not multiples of the blocks, bq=32 != bk=128, every mask kind."""
    start, end, k_pos = _i32(*MASKS[mask]())
    q, k, v = _qkv(0, B, T, S, N, KV, H, jnp.float32)
    (kn, vn), (kz, vz) = _poison(k, v, k_pos)
    out = _kernel_fn(0.1, None, 32, 128)(q, kn, vn, start, end, k_pos=k_pos)
    ref = _reference_fn(0.1, None)(q, kz, vz, start, end, k_pos=k_pos)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref, atol=ATOL[jnp.float32], rtol=0)


@pytest.mark.parametrize("s,window", [(320, 255), (320, 320), (414, 1000)])
def test_forward_whole_blocks_at_their_edges_f32(s, window):
    """T = 320 queries at the last positions of S keys, bq = 32, bk = 128: each case puts a key block one
    key past a query block's whole range, where it must keep its mask. S = T, W = 255: query block 7
    (rows 224..255) starts its rows at keys 1..32, one short of key block 0. S = T, causal: blocks below the
    diagonal are whole. S = 414, causal: query block 1 (positions 126..157) ends its first row at key 126,
    one short of key block 0's last key."""
    t = 320
    start, end, k_pos = _i32(*_window(1, t, s, window))
    q, k, v = _qkv(3, 1, t, s, 4, 2, 128, jnp.float32)
    tables = flash_tpu.block_tables(*_i32(*_padded(start, end, k_pos, t, -(-s // 128) * 128)), 32, 128)
    whole = (tables["in_lo"][:, None] <= tables["all_lo"][None]) & (tables["all_hi"][None] <= tables["in_hi"][:, None])
    assert int(whole.sum()) >= 3  # the unmasked path runs
    out = _kernel_fn(0.1, None, 32, 128)(q, k, v, start, end, k_pos=k_pos)
    ref = _reference_fn(0.1, None)(q, k, v, start, end, k_pos=k_pos)
    np.testing.assert_allclose(out, ref, atol=ATOL[jnp.float32], rtol=0)


def _padded(start, end, k_pos, t, s_pad):
    """The kernel's own padding of keys to s_pad slots (empty) and queries to whole 32-row blocks."""
    t_pad = -(-t // 32) * 32
    pad = lambda x, n, v: np.pad(np.asarray(x), ((0, 0), (0, n - x.shape[1])), constant_values=v)
    return pad(start, t_pad, 0), pad(end, t_pad, -1), pad(k_pos, s_pad, EMPTY)


def test_forward_ragged_padding_f32():
    """Per-row lengths (padding): row 0 holds 260 tokens, row 1 holds 230, so all of its queries
    (positions 230..299) are padding. Padded queries give exact zeros."""
    start, end, k_pos = _i32(*_ragged(B, T, S, [260, 230]))
    q, k, v = _qkv(1, B, T, S, N, KV, H, jnp.float32)
    out = _kernel_fn(0.1, None, 32, 128)(q, k, v, start, end, k_pos=k_pos)
    ref = _reference_fn(0.1, None)(q, k, v, start, end, k_pos=k_pos)
    np.testing.assert_allclose(out, ref, atol=ATOL[jnp.float32], rtol=0)
    assert not np.any(np.asarray(out[0, 30:])) and not np.any(np.asarray(out[1]))
    assert np.all(np.abs(np.asarray(out[0, :30])).sum(-1) > 0)


def test_forward_mqa_head64_softcap_f32():
    """(4, 1) heads, head_dim 64 (zero-padded to 128 lanes), tanh soft-capping, default k_pos."""
    b, t, s = 1, 48, 160
    start, end, _ = _i32(*_window(b, t, s, 23))
    q, k, v = _qkv(2, b, t, s, 4, 1, 64, jnp.float32)
    q = q * 3.0  # large logits so the cap matters
    out = _kernel_fn(0.125, 2.0, 16, 128)(q, k, v, start, end)
    ref = _reference_fn(0.125, 2.0)(q, k, v, start, end)
    np.testing.assert_allclose(out, ref, atol=ATOL[jnp.float32], rtol=0)
    uncapped = _reference_fn(0.125, None)(q, k, v, start, end)
    assert np.abs(np.asarray(uncapped - ref)).max() > 1e-2  # the cap is exercised


def test_forward_bf16():
    """bf16 inputs, (8, 4) heads, head_dim 256, a poisoned ring cache, bq=64 != bk=128."""
    b, t, s = 1, 80, 256
    n, kv, h = 8, 4, 256
    start, end, k_pos = _i32(*_ring(b, t, s, 37, empty=20))
    q, k, v = _qkv(3, b, t, s, n, kv, h, jnp.bfloat16)
    (kn, vn), (kz, vz) = _poison(k, v, k_pos)
    out = _kernel_fn(h**-0.5, None, 64, 128)(q, kn, vn, start, end, k_pos=k_pos)
    ref = _reference_fn(h**-0.5, None)(q, kz, vz, start, end, k_pos=k_pos)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=ATOL[jnp.bfloat16], rtol=0)


# ----------------------------------------------------------------------------- block skipping


@pytest.mark.parametrize("layout", ["far_first_block", "far_middle_block"])
def test_skipped_key_block_is_never_computed(layout):
    """A key block of NaN K/V at *valid* positions 1000.. that no query (230..299, window 64) sees.
    far_first_block: it is outside every query block's [first, last] range (not even fetched).
    far_middle_block: it lies between two visible blocks, so only the in-kernel meets-test skips it.
    Computed, 0 * NaN would poison its whole query block: the control proves the test can fail."""
    start, end, _ = _window(B, T, S, 64)
    if layout == "far_first_block":
        k_pos, far = np.arange(S), slice(0, 128)
        k_pos[far] += 1000
    else:  # slots 0..127 hold 172..299, slots 128..255 hold 1000..1127, slots 256..299 hold 128..171
        k_pos, far = np.concatenate([np.arange(172, 300), np.arange(1000, 1128), np.arange(128, 172)]), slice(128, 256)
    start, end, k_pos = _i32(start, end, np.broadcast_to(k_pos, (B, S)))
    q, k, v = _qkv(4, B, T, S, N, KV, H, jnp.float32)
    kn, vn = k.at[:, far].set(jnp.nan), v.at[:, far].set(jnp.nan)
    kernel = _kernel_fn(0.1, None, 32, 128)
    out = kernel(q, kn, vn, start, end, k_pos=k_pos)
    ref = _reference_fn(0.1, None)(q, k, v, start, end, k_pos=k_pos)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, atol=ATOL[jnp.float32], rtol=0)
    # Control: query 0 now also sees position 1005, so query block 0 (rows 0..31) computes the far block.
    control = kernel(q, kn, vn, start, end.at[:, 0].set(1005), k_pos=k_pos)
    assert np.isnan(np.asarray(control[:, 1:32])).all()  # rows that see no NaN key still get NaN
    assert np.isfinite(np.asarray(control[:, 32:])).all()  # other query blocks still skip it


def test_schedule_fetches_only_intersecting_blocks():
    """The kernels' own index maps: with a sliding window over T = S = 1024 (bq = bk = 128), each
    query block fetches exactly the key blocks that meet its window, each once, and the
    fetched block index never changes on a skipped step (no DMA). The grid's walk axis is
    as long as the longest range, not the number of key blocks."""
    t, w, bq, bk = 1024, 200, 128, 128
    start, end, k_pos = _i32(*_window(1, t, t, w))
    tab = flash_tpu.block_tables(start, end, k_pos, bq, bk)
    cfg = flash_tpu._Config(scale=1.0, softcap=None, groups=2, head_dim=128, block_q=bq, block_k=bk, interpret=False)
    nq = nk = t // bq
    names = ("j_first", "j_last", "q_lo", "q_hi", "k_lo", "k_hi")
    kv_spec = flash_tpu._specs(cfg, nq, nk, q_major=True)[1]
    for i in range(nq):
        fetched = [int(kv_spec.index_map(0, 0, i, j, *(tab[x] for x in names))[1]) for j in range(nk)]
        lo, hi = max(i * bq - w + 1, 0), i * bq + bq - 1  # key positions the block's rows see
        meeting = list(range(lo // bk, hi // bk + 1))
        distinct = [f for n, f in enumerate(fetched) if n == 0 or f != fetched[n - 1]]
        assert distinct == meeting, (i, fetched)
    # The walk axis of the grid is as long as the longest range (3 of nk = 8 blocks), not nk.
    assert int(flash_tpu._walk_length(tab["j_first"], tab["j_last"])) == 3
    assert int(flash_tpu._walk_length(tab["i_first"], tab["i_last"])) == 3
    # Transposed schedule for dK/dV: each key block walks the query blocks that see it.
    q_spec = flash_tpu._specs(cfg, nq, nk, q_major=False)[0]
    names_t = ("i_first", "i_last", "q_lo", "q_hi", "k_lo", "k_hi")
    for j in range(nk):
        fetched = [int(q_spec.index_map(0, 0, j, i, *(tab[x] for x in names_t))[1]) for i in range(nq)]
        distinct = [f for n, f in enumerate(fetched) if n == 0 or f != fetched[n - 1]]
        seen_by = [i for i in range(nq) if max(i * bq - w + 1, 0) <= j * bk + bk - 1 and i * bq + bq - 1 >= j * bk]
        assert distinct == seen_by, (j, fetched)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradients_f32(softcap):
    """custom_vjp (Pallas dq and dk/dv kernels) vs jax.grad of the reference: GQA (4, 2), padded
    T and S, bq != bk, a poisoned ring cache (NaN K/V in empty slots must not reach any gradient)."""
    b, t, s = 1, 72, 300  # 3 x 3 blocks: the walks repeat their last block
    start, end, k_pos = _i32(*_ring(b, t, s, 45, empty=25))
    q, k, v = _qkv(5, b, t, s, N, KV, H, jnp.float32)
    q = q * 2.0
    ct = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)
    (kn, vn), (kz, vz) = _poison(k, v, k_pos)
    kernel = _kernel_fn(0.1, softcap, 32, 128)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, start, end, k_pos=k_pos) * ct))
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, kn, vn)
    want = jax.grad(loss(_reference_fn(0.1, softcap)), argnums=(0, 1, 2))(q, kz, vz)
    for name, g, w in zip("qkv", got, want):
        assert np.isfinite(np.asarray(g)).all(), name
        np.testing.assert_allclose(g, w, atol=ATOL[jnp.float32] * 4, rtol=0, err_msg=f"d{name}")
    empty = np.asarray(k_pos[0] <= EMPTY)
    assert not np.any(np.asarray(got[1])[0, empty]) and not np.any(np.asarray(got[2])[0, empty])


def test_gradients_with_whole_blocks_f32():
    """The unmasked (whole-block) path of the dq and dk/dv kernels: the W = 255 self-attention case of
    test_forward_whole_blocks_at_their_edges_f32, gradients vs jax.grad of the reference."""
    t = 320
    start, end, k_pos = _i32(*_window(1, t, t, 255))
    q, k, v = _qkv(4, 1, t, t, 4, 2, 128, jnp.float32)
    ct = jax.random.normal(jax.random.PRNGKey(2), q.shape, jnp.float32)
    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v, start, end, k_pos=k_pos) * ct))
    got = jax.jit(jax.grad(loss(_kernel_fn(0.1, None, 32, 128)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_reference_fn(0.1, None)), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=ATOL[jnp.float32] * 4, rtol=0, err_msg=f"d{name}")


# ----------------------------------------------------------------------------- TPU lowering at production shapes


@pytest.mark.parametrize(
    "t,n,kv,h,softcap",
    [(32768, 8, 4, 256, None), (8192, 8, 4, 256, None), (32768, 32, 16, 128, None), (8192, 32, 16, 128, None),
     (32768, 4, 1, 256, 50.0)],
)
def test_lowers_for_tpu(t, n, kv, h, softcap):
    """Forward and backward lower to Mosaic for TPU at production shapes (bf16, B=1, T=S)."""
    sds = jax.ShapeDtypeStruct
    q = sds((1, t, n, h), jnp.bfloat16)
    k = sds((1, t, kv, h), jnp.bfloat16)
    iv = sds((1, t), jnp.int32)

    def fwd(q, k, v, start, end, k_pos):
        return flash_tpu.attention(q, k, v, start, end, scale=h**-0.5, softcap=softcap, k_pos=k_pos)

    def bwd(q, k, v, start, end, k_pos):
        loss = lambda q, k, v: fwd(q, k, v, start, end, k_pos).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for f, calls in ((fwd, 1), (bwd, 3)):
        text = jax.jit(f).trace(q, k, k, iv, iv, iv).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == calls, f.__name__


def test_splash_lowers_for_tpu_with_its_exact_path():
    """impl="splash" at T = 8K, W = 1024 lowers for TPU, forward and backward: splash's kernels and,
    under lax.cond for intervals that are not the band, flash_tpu's (2 forward calls; 6 with gradients)."""
    from kernels import jax_ops

    t, n, kv, h = 8192, 8, 4, 256
    sds = jax.ShapeDtypeStruct
    q, k, iv = sds((1, t, n, h), jnp.bfloat16), sds((1, t, kv, h), jnp.bfloat16), sds((1, t), jnp.int32)
    fwd = functools.partial(jax_ops.splash, scale=h**-0.5, softcap=None, window=1024)

    def bwd(q, k, v, start, end):
        return jax.grad(lambda *a: fwd(*a, start, end).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for f, calls in ((fwd, 2), (bwd, 6)):
        text = jax.jit(f).trace(q, k, k, iv, iv).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == calls, f
        assert f"{t}x{t}" not in text, "a T x S array was materialized"
