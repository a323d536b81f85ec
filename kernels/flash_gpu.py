"""Flash attention over per-query key intervals: Pallas GPU (Triton) kernels, forward and backward.

Same semantics as `kernels.reference.attention`: query (b, t) sees key s iff
k_start[b, t] <= k_pos[b, s] <= k_end[b, t]; an empty interval gives a zero row.

Layout and work split (bq, bk: query and key block sizes):
  forward   grid (N, T/bq, B): one query block of one q head; loops over key blocks.
  dq        grid (N, T/bq, B): same loop, recomputing probabilities from the saved logsumexp.
  dk, dv    grid (K, S/bk, B): one key block of one kv head; loops over its G q heads and the
            query blocks that can see it.
GQA is native: q head n reads kv head n // G straight from k, v [B, S, K, H].
On a Hopper GPU bf16/f16 self-attention runs in Mosaic GPU kernels instead (wgmma, TMA, warp
specialisation): the forward in `kernels.flash_hopper`, the backward in `kernels.flash_hopper_bwd`
(measured 1.9-2.3x faster than these at H = 256, 1.2x at H = 128: benchmarks/RESULTS.md, run G). The
Hopper forward leaves the same logsumexp as this one, so either backward can follow either forward.

Block skipping never builds a T x S mask. Small XLA reductions give, per query block, the
union [lo, hi] of its rows' intervals and, per key block, the range [kmin, kmax] of its key
positions (slots at EMPTY = -2**30 ignored); their [B, T/bq, S/bk] overlap table gives each
loop its first and last block. With k_pos=None positions are monotone, so every block in
that range overlaps; with a general k_pos (a ring cache) and in the dk/dv loop, each visited
block is also checked against the table's bounds and skipped (lax.cond) when disjoint.
Inside a visited block every element gets the exact interval test, except in the blocks
`blocks.inside` marks (every row sees every slot: the bulk of a window or a causal
prefix), which the forward and dq loops visit without a mask when positions are monotone.

Unused cache slots may hold NaN: their K/V rows are zeroed before they meet a matmul
(0 * NaN = NaN), and masked scores go through `where`, never through a multiply.

Softmax runs in f32 in base 2: logits are scaled by log2(e) and `lse` is stored as log2.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from kernels import blocks, flash_hopper, flash_hopper_bwd, reference

EMPTY = blocks.EMPTY  # k_pos of an unused cache slot (and of the wrapper's padding keys)
_LOG2E = math.log2(math.e)
SHARED_MEMORY = 224 * 1024  # bytes of tiles per block we plan for (Hopper has 227 KB per block)


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    softcap: float | None
    block_q: int
    block_k: int
    groups: int  # G = N // K query heads per kv head
    general_pos: bool  # k_pos given: positions need not be monotone
    interpret: bool
    num_warps: int | None
    num_stages: int | None
    mosaic: bool = False  # forward by the Hopper kernel (kernels.flash_hopper)
    mosaic_backward: bool = False  # backward by the Hopper kernels (kernels.flash_hopper_bwd)

    def params(self, head_dim: int, itemsize: int, loop_rows: int, fixed_rows: int,
               backward: bool = False) -> pl_triton.CompilerParams:
        """Triton settings for a kernel that streams `loop_rows` [rows, H] tiles per pipeline stage
        and keeps `fixed_rows` resident (fwd: 2 bk streamed, bq fixed; dq: 2 bk, 2 bq; dk/dv: 2 bq, 2 bk).

        Measured on an H200 (H = 256, bf16, window 1024, T = 32K): 64 x 64 blocks run best with 4
        warps and 3 stages; the stage count is then cut until the tiles fit shared memory (there,
        f32 at 64 x 64 x 3 stages asked for 410 KB and the dq kernel at 3 stages also failed). The
        f32 backward (full-precision dots keep extra operand copies) asked for 272 KB at 32 x 32 x 2
        stages, 80 KB over this count, so it runs single-stage.
        """
        big = self.block_q >= 128
        warps = self.num_warps or (8 if big else 4)
        if self.num_stages:
            return pl_triton.CompilerParams(num_warps=warps, num_stages=self.num_stages)
        for stages in ((1,) if backward and itemsize >= 4 else (3, 2, 1)):
            if (stages * loop_rows + fixed_rows) * head_dim * itemsize <= SHARED_MEMORY:
                break
        return pl_triton.CompilerParams(num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------- kernel helpers


def _dot(a, b, *, trans_a=False, trans_b=False):
    """2-D matmul with f32 accumulation (lax.dot_general: present in jax 0.11 and 0.12 alike)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    # f32 operands: full f32 products (Triton otherwise picks TF32 on jax 0.11 GPUs).
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(scores, cfg: _Config):
    """f32 q.k [bq, bk] -> (logits in log2 units, tanh(x / softcap) or None)."""
    x = scores * cfg.scale
    if cfg.softcap is None:
        return x * _LOG2E, None
    t = jnp.tanh(x / cfg.softcap)
    return t * (cfg.softcap * _LOG2E), t


def _visible(k_start, k_end, k_pos):
    """bool [bq, bk]: the exact per-element interval test."""
    return (k_pos[None, :] >= k_start[:, None]) & (k_pos[None, :] <= k_end[:, None])


def _zero_rows_outside(x, k_pos, lo, hi):
    """x [bk, H] with rows whose position is outside [lo, hi] set to 0 (NaN-poisoned slots too)."""
    inside = (k_pos >= lo) & (k_pos <= hi)
    return jnp.where(inside[:, None], x, jnp.zeros_like(x))


def _skip_disjoint(visit, other_meta_ref, lo, hi):
    """Loop body that runs `visit(idx, carry)` only when block idx's [meta[0], meta[1]] meets [lo, hi]."""

    def body(idx, carry):
        overlap = (other_meta_ref[0, idx] <= hi) & (other_meta_ref[1, idx] >= lo)
        return lax.cond(overlap, lambda c: visit(idx, c), lambda c: c, carry)

    return body


def _own_meta(meta_ref, idx):
    """(lo, hi, first, last) of block idx: its interval and the range of blocks its loop visits."""
    return tuple(meta_ref[r, idx] for r in range(4))


# ----------------------------------------------------------------------------- kernels


def _own_loops(meta_ref, idx, general_pos: bool):
    """Blocks the loop of block idx visits, as three ranges: masked [first, a), unmasked [a, b) (the
    blocks `inside` its rows' intervals: contiguous when positions are monotone), masked [b, last].
    With general positions every block takes the mask."""
    lo, hi, first, last, in_first, in_last = (meta_ref[r, idx] for r in range(6))
    if general_pos:
        return lo, hi, (first, last + 1, last + 1, last + 1)
    return lo, hi, blocks.split(first, last, in_first, in_last)


def _loops(masked, unmasked, bounds, carry):
    """Runs the masked, unmasked, masked loops over `bounds` = (first, a, b, end)."""
    first, a, b, end = bounds
    carry = lax.fori_loop(first, a, masked, carry)
    carry = lax.fori_loop(a, b, unmasked, carry)
    return lax.fori_loop(b, end, masked, carry)


def _fwd_kernel(qmeta_ref, kmeta_ref, ks_ref, ke_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg):
    """One query block [bq, H] of one q head; online softmax over its key blocks."""
    lo, hi, bounds = _own_loops(qmeta_ref, pl.program_id(1), cfg.general_pos)
    q, ks, ke = q_ref[...], ks_ref[...], ke_ref[...]
    bq, bk = q.shape[0], cfg.block_k

    def visit(j, carry, masked: bool):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        s, _ = _logits(_dot(q, k_ref[keys, :], trans_b=True), cfg)
        v = v_ref[keys, :]
        if masked:
            k_pos = kpos_ref[keys]
            s = jnp.where(_visible(ks, ke, k_pos), s, -jnp.inf)
            v = _zero_rows_outside(v, k_pos, lo, hi)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new  # rows with nothing visible yet
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + p.sum(axis=1)

    masked = functools.partial(visit, masked=True)
    if cfg.general_pos:
        masked = _skip_disjoint(masked, kmeta_ref, lo, hi)
    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = _loops(masked, functools.partial(visit, masked=False), bounds, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(l))


def _dq_kernel(
    qmeta_ref, kmeta_ref, ks_ref, ke_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg
):
    """dq for one query block of one q head: dq = scale * sum_j dS_j K_j."""
    lo, hi, bounds = _own_loops(qmeta_ref, pl.program_id(1), cfg.general_pos)
    q, do, ks, ke = q_ref[...], do_ref[...], ks_ref[...], ke_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bk = cfg.block_k

    def visit(j, dq, masked: bool):
        keys = pl.ds(j * bk, bk)
        k = k_ref[keys, :]
        if masked:
            k_pos = kpos_ref[keys]
            k = _zero_rows_outside(k, k_pos, lo, hi)
            visible = _visible(ks, ke, k_pos)
        s, t = _logits(_dot(q, k, trans_b=True), cfg)
        p = jnp.exp2((jnp.where(visible, s, -jnp.inf) if masked else s) - lse[:, None])
        dp = _dot(do, v_ref[keys, :], trans_b=True)
        ds = p * (dp - delta[:, None])
        if masked:
            ds = jnp.where(visible, ds, 0.0)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + _dot(ds.astype(k.dtype), k)

    masked = functools.partial(visit, masked=True)
    if cfg.general_pos:
        masked = _skip_disjoint(masked, kmeta_ref, lo, hi)
    dq = _loops(masked, functools.partial(visit, masked=False), bounds, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(
    qmeta_ref, kmeta_ref, ks_ref, ke_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, cfg,
):  # fmt: skip
    """dk, dv for one key block [bk, H] of one kv head, summed over its G q heads and the query blocks that see it."""
    kmin, kmax, first, last = _own_meta(kmeta_ref, pl.program_id(1))
    k_pos, k, v = kpos_ref[...], k_ref[...], v_ref[...]
    bq = cfg.block_q

    def head(g, carry):
        def visit(i, carry):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            visible = _visible(ks_ref[rows], ke_ref[rows], k_pos)
            s, t = _logits(_dot(q, k, trans_b=True), cfg)
            p = jnp.exp2(jnp.where(visible, s, -jnp.inf) - lse[:, None])
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
            dp = _dot(do, v, trans_b=True)
            ds = jnp.where(visible, p * (dp - delta[:, None]), 0.0)
            if t is not None:
                ds = ds * (1.0 - t * t)
            return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

        return lax.fori_loop(first, last + 1, _skip_disjoint(visit, qmeta_ref, kmin, kmax), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _meta_specs(nq, nk):
    return [
        pl.BlockSpec((None, 6, nq), lambda h, x, b: (b, 0, 0)),  # qmeta
        pl.BlockSpec((None, 4, nk), lambda h, x, b: (b, 0, 0)),  # kmeta
    ]


def _query_major_specs(cfg: _Config, q, k):
    """Specs of the grid (N, T/bq, B) kernels (forward, dq): the 7 inputs they share (metadata, interval
    rows, k_pos, the q block, all of k and v), the [bq, H] q-block spec and the [bq] row-statistic spec."""
    b, t, n, h = q.shape
    s = k.shape[1]
    q_block = pl.BlockSpec((None, cfg.block_q, None, h), lambda n_, i, b_: (b_, i, n_, 0))
    kv_full = pl.BlockSpec((None, s, None, h), lambda n_, i, b_: (b_, 0, lax.div(n_, cfg.groups), 0))
    rows = pl.BlockSpec((None, cfg.block_q), lambda n_, i, b_: (b_, i))
    k_pos = pl.BlockSpec((None, s), lambda n_, i, b_: (b_, 0))
    shared = [*_meta_specs(t // cfg.block_q, s // cfg.block_k), rows, rows, k_pos, q_block, kv_full, kv_full]
    return shared, q_block, pl.BlockSpec((None, None, cfg.block_q), lambda n_, i, b_: (b_, n_, i))


def _fwd_call(cfg: _Config, q, k, v, meta):
    """q [B, T, N, H], k, v [B, S, K, H] (padded) -> o [B, T, N, H], lse [B, N, T] f32 (log2)."""
    b, t, n, h = q.shape
    shared, q_block, row_stat = _query_major_specs(cfg, q, k)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n, t // cfg.block_q, b),
        in_specs=shared,
        out_specs=[q_block, row_stat],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=cfg.params(h, q.dtype.itemsize, 2 * cfg.block_k, cfg.block_q),
        interpret=cfg.interpret,
        name="flash_interval_fwd",
    )(*meta, q, k, v)


def _dq_call(cfg: _Config, q, k, v, do, lse, delta, meta):
    b, t, n, h = q.shape
    shared, q_block, row_stat = _query_major_specs(cfg, q, k)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(n, t // cfg.block_q, b),
        in_specs=[*shared, q_block, row_stat, row_stat],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cfg.params(h, q.dtype.itemsize, 2 * cfg.block_k, 2 * cfg.block_q, backward=True),
        interpret=cfg.interpret,
        name="flash_interval_dq",
    )(*meta, q, k, v, do, lse, delta)


def _dkdv_call(cfg: _Config, q, k, v, do, lse, delta, meta):
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    kv_block = pl.BlockSpec((None, bk, None, h), lambda c, j, b_: (b_, j, c, 0))
    q_group = pl.BlockSpec((None, t, g, h), lambda c, j, b_: (b_, 0, c, 0))  # q heads c*G .. c*G+G-1
    rows = pl.BlockSpec((None, t), lambda c, j, b_: (b_, 0))
    row_stat = pl.BlockSpec((None, g, t), lambda c, j, b_: (b_, c, 0))
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(kv_heads, s // bk, b),
        in_specs=[
            *_meta_specs(t // bq, s // bk),
            rows,
            rows,
            pl.BlockSpec((None, bk), lambda c, j, b_: (b_, j)),
            q_group,
            kv_block,
            kv_block,
            q_group,
            row_stat,
            row_stat,
        ],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=cfg.params(h, q.dtype.itemsize, 2 * bq, 2 * bk, backward=True),
        interpret=cfg.interpret,
        name="flash_interval_dkdv",
    )(*meta, q, k, v, do, lse, delta)


# ----------------------------------------------------------------------------- custom_vjp


def _forward(cfg: _Config, q, k, v, meta):
    """(o, lse [B, N, T] f32 log2): the Hopper kernel when cfg.mosaic, else Triton."""
    if cfg.mosaic:
        _, _, k_start, k_end, _ = meta
        return flash_hopper.forward(q, k, v, k_start, k_end, scale=cfg.scale, interpret=cfg.interpret)
    return _fwd_call(cfg, q, k, v, meta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, meta):
    return _forward(cfg, q, k, v, meta)[0]


def _flash_fwd(cfg: _Config, q, k, v, meta):
    o, lse = _forward(cfg, q, k, v, meta)
    return o, (q, k, v, meta, o, lse)


def _flash_bwd(cfg: _Config, res, do):
    q, k, v, meta, o, lse = res
    if cfg.mosaic_backward:
        _, _, k_start, k_end, _ = meta
        dq, dk, dv = flash_hopper_bwd.backward(q, k, v, o, lse, do, k_start, k_end, scale=cfg.scale,
                                               interpret=cfg.interpret)
        return dq, dk, dv, jax.tree.map(lambda _: None, meta)
    delta = reference.softmax_delta(o, do)
    dq = _dq_call(cfg, q, k, v, do, lse, delta, meta)
    dk, dv = _dkdv_call(cfg, q, k, v, do, lse, delta, meta)
    return dq, dk, dv, jax.tree.map(lambda _: None, meta)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- block metadata (XLA)


def block_meta(k_start, k_end, k_pos, block_q, block_k):
    """Per-block bounds. k_start, k_end [B, T], k_pos [B, S] (T, S multiples of the blocks).

    Returns qmeta [B, 6, T/bq] = (lo, hi, first key block, last key block, first and last key
    block inside every row's interval) and kmeta [B, 4, S/bk] = (kmin, kmax, first query block,
    last query block), int32; (0, -1) where a block meets none, so a loop over it is empty.
    """
    lo, hi, kmin, kmax, overlap = blocks.hulls(k_start, k_end, k_pos, block_q, block_k)
    k_first, k_last = blocks.first_last(overlap, axis=2)
    in_first, in_last = blocks.first_last(blocks.inside(k_start, k_end, k_pos, block_q, block_k), axis=2)
    q_first, q_last = blocks.first_last(overlap, axis=1)
    qmeta = jnp.stack([lo, hi, k_first, k_last, in_first, in_last], axis=1).astype(jnp.int32)
    kmeta = jnp.stack([kmin, kmax, q_first, q_last], axis=1).astype(jnp.int32)
    return qmeta, kmeta


# ----------------------------------------------------------------------------- entry point


def default_block(head_dim: int, itemsize: int) -> int:
    """Default block_q = block_k: 64, or 32 where a [64, H] tile takes 64 KB or more. Measured on an H200
    (jax 0.11.2): the f32 backward at H = 256 asked for 272 KB of shared memory at 64 x 64, single-stage."""
    return 64 if 64 * _pow2_at_least(head_dim) * itemsize < 64 * 1024 else 32


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, blocks.next_pow2(x))


def _pad_axis(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "softcap", "block_q", "block_k", "interpret", "num_warps", "num_stages", "mosaic",
                     "mosaic_backward"),
)
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
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
    mosaic: bool | None = None,
    mosaic_backward: bool | None = None,
) -> jax.Array:
    """Flash attention of q [B, T, N, H] over k, v [B, S, K, H] within per-query key intervals.

    Query (b, t) sees key s iff k_start[b, t] <= k_pos[b, s] <= k_end[b, t] (k_pos int32 [B, S],
    default s; unused slots at -2**30 are never visible). Differentiable in q, k, v.
    block_q, block_k: powers of two >= 16 (shrunk to the padded sequence when it is shorter);
      default `default_block(H, itemsize)`: 64, or 32 where a [64, H] tile takes 64 KB (f32 at H = 256).
    num_warps / num_stages: Triton settings (default 4 warps, 3 stages; 8 and 2 for block_q >= 128 at H = 256).
    mosaic: run the forward by the Hopper kernel (kernels.flash_hopper: wgmma + TMA). Default: where it
      serves the call (self-attention, k_pos None, bf16/f16, H a multiple of 64 up to 256, no softcap)
      on a Hopper GPU. True forces it (in interpret mode on CPU).
    mosaic_backward: run the backward by the Hopper kernels (kernels.flash_hopper_bwd) instead of
      Triton's. Default: on the shapes and devices `mosaic` defaults to (on an H200 forward + backward
      took 3.0 ms to Triton's 6.6 at T = 32K, W = 1024, H = 256). True forces it (interpret mode on CPU).
    Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % kv_heads:
        raise ValueError(
            f"flash_gpu.attention expects q [B,T,N,H], k = v [B,S,K,H] with K | N; got {q.shape}, {k.shape}, {v.shape}"
        )
    block = default_block(h, q.dtype.itemsize)
    block_q, block_k = block_q or block, block_k or block
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {blk}")
    hopper_shape = flash_hopper.serves(q, k, softcap, k_pos)
    on_hopper = not interpret and hopper_shape and flash_hopper.on_hopper()
    mosaic = on_hopper if mosaic is None else mosaic
    mosaic_backward = on_hopper if mosaic_backward is None else mosaic_backward
    for name, forced in (("mosaic", mosaic), ("mosaic_backward", mosaic_backward)):
        if forced and not hopper_shape:
            raise ValueError(f"{name}=True needs self-attention with k_pos None, bf16/f16, H a multiple of 64 "
                             "up to 256 and no softcap")
    bq = min(block_q, _pow2_at_least(t))
    bk = min(block_k, _pow2_at_least(s))
    t_pad, s_pad, h_pad = blocks.round_up(t, bq), blocks.round_up(s, bk), _pow2_at_least(h)
    if mosaic or mosaic_backward:  # whole Hopper tiles; S == T, and bq, bk divide the tile
        t_pad = s_pad = blocks.round_up(t, max(bq, bk, flash_hopper.TILE))

    general_pos = k_pos is not None
    if k_pos is None:
        k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        # keys sit at 0 .. S-1: an interval reaching past S-1 must not reach the padding keys, which the
        # Hopper kernels place at positions S .. s_pad-1 (the Triton ones mark them EMPTY)
        k_end = jnp.minimum(k_end, s - 1)
    k_pos = _pad_axis(k_pos.astype(jnp.int32), 1, s_pad, EMPTY)
    k_start = _pad_axis(k_start.astype(jnp.int32), 1, t_pad, 0)
    k_end = _pad_axis(k_end.astype(jnp.int32), 1, t_pad, -1)  # padded queries: empty interval
    q_p = _pad_axis(_pad_axis(q, 1, t_pad), 3, h_pad)
    k_p = _pad_axis(_pad_axis(k, 1, s_pad), 3, h_pad)
    v_p = _pad_axis(_pad_axis(v, 1, s_pad), 3, h_pad)

    qmeta, kmeta = block_meta(k_start, k_end, k_pos, bq, bk)
    cfg = _Config(
        scale=float(scale),
        softcap=None if softcap is None else float(softcap),
        block_q=bq,
        block_k=bk,
        groups=n // kv_heads,
        general_pos=general_pos,
        interpret=interpret,
        num_warps=num_warps,
        num_stages=num_stages,
        mosaic=mosaic,
        mosaic_backward=mosaic_backward,
    )
    out = _flash(cfg, q_p, k_p, v_p, (qmeta, kmeta, k_start, k_end, k_pos))
    return out[:, :t, :, :h]
