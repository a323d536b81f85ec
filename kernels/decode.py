"""Decode attention (one query token per row) over a compact KV cache: a split-K Pallas kernel.

Ring (local) and linear (global) caches are the same computation; they differ
only in `k_pos`, the position each slot holds. The kernel:

  grid (batch b, kv head h, split j); each program owns one contiguous run of
  key blocks of row b's *live* range (the blocks holding at least one visible
  key, found by a small XLA reduction), so a 32K-slot cache with 1K tokens in
  it reads ~1K keys, spread over all splits;
  the G query heads of kv head h form one [G, H] tile (padded to 16 rows for
  the tensor cores), so each key block is a [G, H] x [H, bk] matmul;
  an online softmax over the blocks, with keys outside [k_start, k_end] masked
  out of the scores *and* of V (unused slots may hold NaN);
  each split writes its normalised partial output and its log-sum-exp, and an
  XLA log-sum-exp merge combines the splits.

GPU-style (Triton) pallas_call; `interpret=True` runs it on CPU. Uses only
Pallas APIs present in jax 0.11 and 0.12: pl.pallas_call, pl.BlockSpec with
None (squeezed) dims, pl.ds, jax.experimental.pallas.triton.{dot, load,
store, CompilerParams}.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.blocks import EMPTY, next_pow2

_NEG = -1e30  # a finite -inf for running maxima: exp(_NEG - _NEG) is 1, never NaN
_MIN_ROWS = 16  # Triton's dot needs at least 16 rows


def _kernel(meta_ref, q_ref, k_ref, v_ref, pos_ref, o_ref, lse_ref, *, scale, softcap, block_k, num_slots,
            groups, precision):
    """One (row b, kv head h, split j).

    meta_ref [4] int32: first key block, end key block (exclusive), k_start, k_end.
    q_ref [Gp, H]; k_ref, v_ref [S, H]; pos_ref [S] int32.
    o_ref [Gp, H] f32: softmax-normalised output of this split's keys; lse_ref [Gp]: their log-sum-exp.
    """
    first, end, k_start, k_end = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    q = q_ref[...]
    rows, head_dim = q.shape
    ragged = num_slots % block_k != 0  # static: only then can a block run past the last slot

    def load(ref, start, slots, other):
        """Keys start .. start + bk of ref; past the last slot (ragged tail) they read as `other`."""
        block = ref.at[pl.ds(start, block_k)] if ref.ndim == 1 else ref.at[pl.ds(start, block_k), :]
        if not ragged:
            return block[...]
        inside = slots < num_slots
        return plgpu.load(block, mask=inside if ref.ndim == 1 else inside[:, None], other=other)

    def body(i, carry):
        o, m, l = carry
        start = i * block_k
        slots = start + jnp.arange(block_k, dtype=jnp.int32)
        pos = load(pos_ref, start, slots, EMPTY)
        visible = (pos >= k_start) & (pos <= k_end)  # [bk]
        if ragged:
            visible &= slots < num_slots
        k = load(k_ref, start, slots, 0)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * scale  # [Gp, bk] f32
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(visible[None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(visible[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        v = load(v_ref, start, slots, 0)
        v = jnp.where(visible[:, None], v, jnp.zeros_like(v))  # unused slots may hold NaN: 0 * NaN = NaN
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)  # [Gp, H] f32
        return alpha[:, None] * o + pv, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(first, end, body, init)
    seen = l > 0
    o = o / jnp.where(seen, l, 1.0)[:, None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    real = jnp.arange(rows) < groups  # padded query rows are never read back: skip their stores
    plgpu.store(o_ref, o.astype(o_ref.dtype), mask=real[:, None])
    plgpu.store(lse_ref, lse, mask=real)


def _split_ranges(visible: jax.Array, block_k: int, num_splits: int) -> tuple[jax.Array, jax.Array]:
    """int32 [B, num_splits] first and end key block of each split.

    visible: bool [B, S]. The live range of row b runs from its first to its last
    block holding a visible key; it is cut into num_splits near-equal runs.
    """
    b, s = visible.shape
    num_blocks = pl.cdiv(s, block_k)
    visible = jnp.pad(visible, ((0, 0), (0, num_blocks * block_k - s)))
    live = jnp.any(visible.reshape(b, num_blocks, block_k), axis=2)  # [B, nb]
    idx = jnp.arange(num_blocks, dtype=jnp.int32)
    lo = jnp.min(jnp.where(live, idx, num_blocks), axis=1)
    hi = jnp.maximum(jnp.max(jnp.where(live, idx + 1, 0), axis=1), lo)  # empty row: [nb, nb)
    per = (hi - lo + num_splits - 1) // num_splits
    split = jnp.arange(num_splits, dtype=jnp.int32)
    first = jnp.minimum(lo[:, None] + split * per[:, None], hi[:, None])
    end = jnp.minimum(first + per[:, None], hi[:, None])
    return first, end


def _merge(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Combines splits: o [B, K, J, G, H] f32, lse [B, K, J, G] -> [B, K, G, H] f32 (zeros where no key was seen)."""
    m = jnp.max(lse, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)  # exp(-inf) = 0: splits that saw nothing
    denom = jnp.sum(w, axis=2)
    out = jnp.einsum("BKJGH,BKJG->BKGH", o, w)
    return out / jnp.where(denom == 0, 1.0, denom)[..., None]


def serves(head_dim: int) -> bool:
    """Whether the kernel takes this head_dim: a power of two >= 16 (flash_gpu pads the others)."""
    return head_dim >= 16 and head_dim == next_pow2(head_dim)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    k_pos: jax.Array | None = None,
    block_k: int = 64,
    num_splits: int = 16,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention, the semantics of kernels.reference.attention for one query per row.

    Args:
      q: [B, 1, N, H] (N = K * G); H a power of two >= 16.
      k, v: [B, S, K, H], a ring (S = W) or linear (S = max_len) cache.
      k_start, k_end: int32 [B, 1]; row b sees slots s with k_start <= k_pos[b, s] <= k_end.
      k_pos: int32 [B, S], the position each slot holds (EMPTY for unused slots);
        default arange(S).
      block_k: keys per block (a power of two >= 16). num_splits: programs per
        (row, kv head) along the keys. num_warps, num_stages: Triton's. The
        defaults were the fastest within noise on an H200 (jax 0.11.2) at B=8,
        32768 slots, N=8, K=4, H=256, bf16: 0.266 ms for a full cache (~4.0 TB/s
        of K/V read; the XLA reference takes 0.89 ms). block_k=128 with
        num_stages=3 (or f32 with H=256) exceeds the shared memory.

    Returns:
      [B, 1, N, H] in q's dtype; zeros for a row with an empty interval.

    Differentiable in q, k, v (reverse mode): a decode step is one query row of the flash kernel, whose
    backward (kernels.flash_gpu, recomputing its forward) serves it.
    """
    b, t, n, h = q.shape
    _, s, kv_heads, _ = k.shape
    if t != 1:
        raise ValueError(f"decode attention takes one query per row (q [B, 1, N, H]); got q {q.shape}")
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % kv_heads:
        raise ValueError(f"decode attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if not serves(h):
        raise ValueError(f"decode attention needs a head_dim that is a power of two >= 16; got {h}")
    if block_k < 16 or block_k != next_pow2(block_k):
        raise ValueError(f"block_k must be a power of two >= 16; got {block_k}")
    if k_pos is None:
        k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    opts = _Options(float(scale), None if softcap is None else float(softcap), block_k, num_splits, num_warps,
                    num_stages, interpret)
    return _decode(opts, q, k, v, k_start.astype(jnp.int32), k_end.astype(jnp.int32), k_pos.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class _Options:
    """`attention`'s static arguments (hashable: custom_vjp's nondiff argument)."""
    scale: float
    softcap: float | None
    block_k: int
    num_splits: int
    num_warps: int
    num_stages: int
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(opts: _Options, q, k, v, k_start, k_end, k_pos):
    return _forward(opts, q, k, v, k_start, k_end, k_pos)


def _decode_fwd(opts: _Options, q, k, v, k_start, k_end, k_pos):
    return _forward(opts, q, k, v, k_start, k_end, k_pos), (q, k, v, k_start, k_end, k_pos)


def _decode_bwd(opts: _Options, res, do):
    from kernels import flash_gpu

    q, k, v, k_start, k_end, k_pos = res
    _, pullback = jax.vjp(lambda q, k, v: flash_gpu.attention(q, k, v, k_start, k_end, scale=opts.scale,
                                                              softcap=opts.softcap, k_pos=k_pos,
                                                              interpret=opts.interpret), q, k, v)
    return (*pullback(do), None, None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def _forward(opts: _Options, q, k, v, k_start, k_end, k_pos):
    """The split-K kernel and its merge: q [B, 1, N, H] -> [B, 1, N, H]."""
    b, _, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = n // kv_heads
    rows = max(_MIN_ROWS, next_pow2(groups))
    block_k = min(opts.block_k, max(16, next_pow2(s)))
    num_splits = max(1, min(opts.num_splits, pl.cdiv(s, block_k)))

    k_start, k_end = k_start[:, 0], k_end[:, 0]
    visible = (k_pos >= k_start[:, None]) & (k_pos <= k_end[:, None])
    first, end = _split_ranges(visible, block_k, num_splits)
    bounds = jnp.broadcast_to(jnp.stack([k_start, k_end], axis=1)[:, None, :], (b, num_splits, 2))
    meta = jnp.concatenate([first[..., None], end[..., None], bounds], axis=2)  # [B, J, 4]

    qg = q.reshape(b, kv_heads, groups, h)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - groups), (0, 0)))  # [B, K, Gp, H]
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, scale=opts.scale, softcap=opts.softcap, block_k=block_k, num_slots=s,
                               groups=groups, precision=precision)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda i, j, c: (i, c, 0)),
            pl.BlockSpec((None, None, rows, h), lambda i, j, c: (i, j, 0, 0)),
            pl.BlockSpec((None, s, None, h), lambda i, j, c: (i, 0, j, 0)),
            pl.BlockSpec((None, s, None, h), lambda i, j, c: (i, 0, j, 0)),
            pl.BlockSpec((None, s), lambda i, j, c: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, h), lambda i, j, c: (i, j, c, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, j, c: (i, j, c, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=opts.num_warps, num_stages=opts.num_stages),
        interpret=opts.interpret,
        name="decode_attention",
    )(meta, qg, k, v, k_pos)
    out = _merge(o[..., :groups, :], lse[..., :groups])
    return out.reshape(b, 1, n, h).astype(q.dtype)
