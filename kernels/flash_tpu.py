"""Flash attention over per-query key intervals: Pallas TPU (Mosaic) kernels, forward and backward.

Same semantics as `kernels.reference.attention`: query (b, t) sees keys s with
k_start[b, t] <= k_pos[b, s] <= k_end[b, t]; an empty interval yields a zero row.
Slots with k_pos <= -2**30 are empty cache slots: never visible, and their K/V
(possibly NaN) never reach an output or a gradient.

Layout. q, o: [B, T, N*H] (a free reshape of [B, T, N, H]); k, v: [B, S, K*H].
One grid step takes the G = N/K query heads of one kv head ([bq, G*H], lane block
`kv_head`) against one key block ([bk, H]), so K/V are fetched once per group,
never repeated per query head. H is zero-padded to a multiple of 128 (lanes).

Block skipping. Per query block i: lo_i = min k_start, hi_i = max k_end over its
non-empty rows; per key block j: [min, max] of its non-empty k_pos. Block (i, j)
can hold a visible pair only if the two ranges meet. These small tables
([B*nq], [B*nk], from a [B, nq, nk] block-level test, never a T x S mask) go to
SMEM by scalar prefetch. The last grid axis walks the meeting range
[first_i, last_i] of key blocks and then repeats last_i; its extent is dynamic,
the longest range over all query blocks (a sliding window over 32K keys walks
~W/bk blocks, not S/bk). A repeated block index means no new DMA, and pl.when
skips the compute of repeated steps and of in-range blocks that do not meet
(ring buffers). Inside a visited block the exact per-element interval test
applies, except where every row sees every slot of the block (the bulk of a
window or causal prefix, `blocks.inside_hulls`): those run unmasked and uncleaned.
The dK/dV kernel walks query blocks per key block the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import blocks, reference

EMPTY_POS = blocks.EMPTY  # k_pos of an empty cache slot (and of padded keys)
_LANES = 128
_SUBLANES = 8
_M_INIT = -1e30  # finite running-max start: exp(-inf - _M_INIT) == 0, never NaN
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    softcap: float | None
    groups: int  # G = N / K query heads per kv head
    head_dim: int  # padded H, a multiple of 128
    block_q: int
    block_k: int
    interpret: Any  # False or pltpu.InterpretParams


# --------------------------------------------------------------------------- block tables


def block_tables(k_start, k_end, k_pos, block_q: int, block_k: int):
    """Scalar-prefetch tables of the block-sparse schedule (all int32, flattened over batch).

    k_start, k_end: [B, Tp]; k_pos: [B, Sp] (Tp % block_q == Sp % block_k == 0).
    Returns dict with q_lo/q_hi [B*nq] (interval hull of a query block's non-empty rows),
    k_lo/k_hi [B*nk] (hull of a key block's non-empty slots), j_first/j_last [B*nq]
    (range of key blocks that meet query block i), i_first/i_last [B*nk] (the
    transpose), and in_lo/in_hi [B*nq], all_lo/all_hi [B*nk] (`blocks.inside_hulls`: which
    visited blocks every row sees whole). A block with no partner gets first = last = 0 and
    fails `meets`.
    """
    q_lo, q_hi, k_lo, k_hi, meets = blocks.hulls(k_start, k_end, k_pos, block_q, block_k)
    in_lo, in_hi, all_lo, all_hi = blocks.inside_hulls(k_start, k_end, k_pos, block_q, block_k)
    j_first, j_last = blocks.first_last(meets, axis=2, none=(0, 0))
    i_first, i_last = blocks.first_last(meets, axis=1, none=(0, 0))
    flat = lambda x: x.reshape(-1).astype(jnp.int32)
    return dict(
        j_first=flat(j_first), j_last=flat(j_last), i_first=flat(i_first), i_last=flat(i_last),
        q_lo=flat(q_lo), q_hi=flat(q_hi), k_lo=flat(k_lo), k_hi=flat(k_hi),
        in_lo=flat(in_lo), in_hi=flat(in_hi), all_lo=flat(all_lo), all_hi=flat(all_hi),
    )


TABLES = ("q_lo", "q_hi", "k_lo", "k_hi", "in_lo", "in_hi", "all_lo", "all_hi")  # after the walk's first, last


def _walk(first_ref, last_ref, row, step):
    """Block visited at `step` of a walk over [first, last]: first, first+1, ..., last, last, ..."""
    return jnp.minimum(first_ref[row] + step, last_ref[row])


def _walk_length(first, last):
    """Dynamic grid extent of the walk axis: the longest [first, last] range (>= 1)."""
    return jnp.max(last - first) + 1


def _visits(first_ref, last_ref, row, step):
    return first_ref[row] + step <= last_ref[row]


def _meets(q_lo_ref, q_hi_ref, k_lo_ref, k_hi_ref, qrow, krow):
    return (k_lo_ref[krow] <= q_hi_ref[qrow]) & (k_hi_ref[krow] >= q_lo_ref[qrow])


def _when_visited(tables, visit, qrow, krow):
    """Decorator: runs step(masked=True) on a visited block that meets the query block, or
    step(masked=False) where every row sees it whole (no mask, no cleaning: it has no empty slot)."""
    q_lo, q_hi, k_lo, k_hi, in_lo, in_hi, all_lo, all_hi = tables
    visit = visit & _meets(q_lo, q_hi, k_lo, k_hi, qrow, krow)
    whole = (in_lo[qrow] <= all_lo[krow]) & (all_hi[krow] <= in_hi[qrow])

    def run(step):
        pl.when(visit & ~whole)(functools.partial(step, True))
        pl.when(visit & whole)(functools.partial(step, False))

    return run


# --------------------------------------------------------------------------- in-kernel helpers


def _interval_mask(qs_ref, qe_ref, kp_row_ref):
    """bool [bq, bk]: k_start[t] <= k_pos[s] <= k_end[t] (intervals lane-replicated, k_pos sublane-replicated)."""
    bk = kp_row_ref.shape[-1]
    reps = bk // _LANES
    qs = jnp.tile(qs_ref[0], (1, reps))  # [bq, bk]
    qe = jnp.tile(qe_ref[0], (1, reps))
    kp = kp_row_ref[0, :1, :]  # [1, bk]
    return (kp >= qs) & (kp <= qe)


def _clean(x, kp_col_ref):
    """x [bk, H] with the rows of empty slots (k_pos <= EMPTY_POS) set to 0, so 0 * NaN never happens."""
    filled = jnp.tile(kp_col_ref[0], (1, x.shape[-1] // _LANES)) > EMPTY_POS  # [bk, H]
    return jnp.where(filled, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _scores(q, k, mask, cfg: _Config):
    """f32 [bq, bk] logits (scaled, soft-capped, masked to -inf unless mask is None) and
    tanh(logit / cap) for the backward."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    t = None
    if cfg.softcap is not None:
        t = jnp.tanh(s * (1.0 / cfg.softcap))
        s = t * cfg.softcap
    return (s if mask is None else jnp.where(mask, s, -jnp.inf)), t


def _lanes(x, n):
    """[r, 128] lane-replicated -> [r, n]."""
    return jnp.tile(x, (1, n // _LANES))


def _head(ref, g, h):
    """Head g of a [1, rows, G*H] block: [rows, H] (lane-aligned static slice)."""
    return ref[0, :, g * h : (g + 1) * h]


# --------------------------------------------------------------------------- forward


def _fwd_kernel(j_first, j_last, *refs, cfg: _Config, nq: int, nk: int):
    """refs: the SMEM tables of TABLES, then the VMEM blocks, the outputs and the scratch."""
    tables, (q_ref, k_ref, v_ref, qs_ref, qe_ref, kp_row_ref, kp_col_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc) = (
        refs[: len(TABLES)], refs[len(TABLES) :])
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qrow = b * nq + i
    kblk = _walk(j_first, j_last, qrow, j)
    h, bk = cfg.head_dim, cfg.block_k

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _M_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @_when_visited(tables, _visits(j_first, j_last, qrow, j), qrow, b * nk + kblk)
    def _step(masked: bool):
        mask = _interval_mask(qs_ref, qe_ref, kp_row_ref) if masked else None
        k = k_ref[0]  # NaN keys only reach masked scores, which jnp.where drops
        v = _clean(v_ref[0], kp_col_ref) if masked else v_ref[0]
        for g in range(cfg.groups):
            s, _ = _scores(_head(q_ref, g, h), k, mask, cfg)  # [bq, bk]
            m_prev = m_sc[g]  # [bq, 128]
            m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            p = jnp.exp(s - _lanes(m_new, bk))
            alpha = jnp.exp(m_prev - m_new)
            l_sc[g] = alpha * l_sc[g] + p.sum(axis=1, keepdims=True)
            pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_sc[g] = _lanes(alpha, h) * acc_sc[g] + pv
            m_sc[g] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        for g in range(cfg.groups):
            l = l_sc[g]
            seen = l > 0.0  # False only for rows with no visible key
            inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
            o_ref[0, :, g * h : (g + 1) * h] = (acc_sc[g] * _lanes(inv, h)).astype(o_ref.dtype)
            lse_ref[0, g] = jnp.where(seen, m_sc[g] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)


def _specs(cfg: _Config, nq: int, nk: int, *, q_major: bool):
    """BlockSpecs of every operand. q_major: grid (B, K, nq, nk-walk); else (B, K, nk, nq-walk)."""
    bq, bk, h, g = cfg.block_q, cfg.block_k, cfg.head_dim, cfg.groups

    if q_major:  # index maps get (b, kv_head, i, step, *tables)
        def qi(b, kh, i, st, jf, jl, *_):
            return i

        def kj(b, kh, i, st, jf, jl, *_):
            return _walk(jf, jl, b * nq + i, st)
    else:  # (b, kv_head, j, step, i_first, i_last, *tables)
        def qi(b, kh, j, st, i_f, i_l, *_):
            return _walk(i_f, i_l, b * nk + j, st)

        def kj(b, kh, j, st, i_f, i_l, *_):
            return j

    q_spec = pl.BlockSpec((1, bq, g * h), lambda b, kh, x, y, *t: (b, qi(b, kh, x, y, *t), kh))
    kv_spec = pl.BlockSpec((1, bk, h), lambda b, kh, x, y, *t: (b, kj(b, kh, x, y, *t), kh))
    row_spec = pl.BlockSpec((1, g, bq, _LANES), lambda b, kh, x, y, *t: (b, kh, qi(b, kh, x, y, *t), 0))
    qint_spec = pl.BlockSpec((1, bq, _LANES), lambda b, kh, x, y, *t: (b, qi(b, kh, x, y, *t), 0))
    kp_row_spec = pl.BlockSpec((1, _SUBLANES, bk), lambda b, kh, x, y, *t: (b, 0, kj(b, kh, x, y, *t)))
    kp_col_spec = pl.BlockSpec((1, bk, _LANES), lambda b, kh, x, y, *t: (b, kj(b, kh, x, y, *t), 0))
    return q_spec, kv_spec, row_spec, qint_spec, kp_row_spec, kp_col_spec


def _layouts(k_start, k_end, k_pos):
    """Per-element interval data in TPU-friendly layouts (lane- / sublane-replicated int32)."""
    b, tp = k_start.shape
    sp = k_pos.shape[1]
    qs = jnp.broadcast_to(k_start[:, :, None], (b, tp, _LANES))
    qe = jnp.broadcast_to(k_end[:, :, None], (b, tp, _LANES))
    kp_row = jnp.broadcast_to(k_pos[:, None, :], (b, _SUBLANES, sp))
    kp_col = jnp.broadcast_to(k_pos[:, :, None], (b, sp, _LANES))
    return qs, qe, kp_row, kp_col


def _compiler_params():
    # The key walk (last grid axis) accumulates; everything else is independent.
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _forward(q, k, v, k_start, k_end, k_pos, cfg: _Config):
    """q [B, Tp, N*H], k/v [B, Sp, K*H] -> o [B, Tp, N*H], lse f32 [B, N, Tp, 128], tables."""
    b, tp, nh = q.shape
    sp, kvh = k.shape[1], k.shape[2] // cfg.head_dim
    nq, nk = tp // cfg.block_q, sp // cfg.block_k
    tab = block_tables(k_start, k_end, k_pos, cfg.block_q, cfg.block_k)
    q_spec, kv_spec, row_spec, qint_spec, kp_row_spec, kp_col_spec = _specs(cfg, nq, nk, q_major=True)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2 + len(TABLES),
        grid=(b, kvh, nq, _walk_length(tab["j_first"], tab["j_last"])),
        in_specs=[q_spec, kv_spec, kv_spec, qint_spec, qint_spec, kp_row_spec, kp_col_spec],
        out_specs=[q_spec, row_spec],
        scratch_shapes=[
            pltpu.VMEM((cfg.groups, cfg.block_q, _LANES), jnp.float32),
            pltpu.VMEM((cfg.groups, cfg.block_q, _LANES), jnp.float32),
            pltpu.VMEM((cfg.groups, cfg.block_q, cfg.head_dim), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, nh // cfg.head_dim, tp, _LANES), jnp.float32),
        ],
        interpret=cfg.interpret,
        name="flash_interval_fwd",
        compiler_params=_compiler_params(),
    )(
        tab["j_first"], tab["j_last"], *(tab[name] for name in TABLES),
        q, k, v, *_layouts(k_start, k_end, k_pos),
    )
    return o, lse


# --------------------------------------------------------------------------- backward


def _probs_and_dscore(q, k, v, do, lse, delta, mask, cfg: _Config):
    """Recomputed probabilities p [bq, bk] and d(loss)/d(raw scaled logit) ds [bq, bk], both f32."""
    bk = cfg.block_k
    s, t = _scores(q, k, mask, cfg)
    p = jnp.exp(s - _lanes(lse, bk))  # masked -> exp(-inf) = 0
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta, bk))
    if t is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dq_kernel(j_first, j_last, *refs, cfg: _Config, nq: int, nk: int):
    tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, qe_ref, kp_row_ref, kp_col_ref, dq_ref,
             dq_sc) = refs[: len(TABLES)], refs[len(TABLES) :]
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    qrow = b * nq + i
    kblk = _walk(j_first, j_last, qrow, j)
    h = cfg.head_dim

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @_when_visited(tables, _visits(j_first, j_last, qrow, j), qrow, b * nk + kblk)
    def _step(masked: bool):
        mask = _interval_mask(qs_ref, qe_ref, kp_row_ref) if masked else None
        k = _clean(k_ref[0], kp_col_ref) if masked else k_ref[0]
        v = _clean(v_ref[0], kp_col_ref) if masked else v_ref[0]
        for g in range(cfg.groups):
            _, ds = _probs_and_dscore(
                _head(q_ref, g, h), k, v, _head(do_ref, g, h), lse_ref[0, g], delta_ref[0, g], mask, cfg
            )
            dq_sc[g] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        for g in range(cfg.groups):
            dq_ref[0, :, g * h : (g + 1) * h] = (dq_sc[g] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(i_first, i_last, *refs, cfg: _Config, nq: int, nk: int):
    tables, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qs_ref, qe_ref, kp_row_ref, kp_col_ref, dk_ref, dv_ref,
             dk_sc, dv_sc) = refs[: len(TABLES)], refs[len(TABLES) :]
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    krow = b * nk + j
    qblk = _walk(i_first, i_last, krow, i)
    h = cfg.head_dim

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @_when_visited(tables, _visits(i_first, i_last, krow, i), b * nq + qblk, krow)
    def _step(masked: bool):
        mask = _interval_mask(qs_ref, qe_ref, kp_row_ref) if masked else None
        k = _clean(k_ref[0], kp_col_ref) if masked else k_ref[0]
        v = _clean(v_ref[0], kp_col_ref) if masked else v_ref[0]
        for g in range(cfg.groups):  # the G query heads of this kv head all add into dk, dv
            q, do = _head(q_ref, g, h), _head(do_ref, g, h)
            p, ds = _probs_and_dscore(q, k, v, do, lse_ref[0, g], delta_ref[0, g], mask, cfg)
            dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
            dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[0] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[0] = dv_sc[...].astype(dv_ref.dtype)


def _backward(q, k, v, o, lse, do, k_start, k_end, k_pos, cfg: _Config):
    b, tp, nh = q.shape
    sp, kvh = k.shape[1], k.shape[2] // cfg.head_dim
    n = nh // cfg.head_dim
    nq, nk = tp // cfg.block_q, sp // cfg.block_k
    tab = block_tables(k_start, k_end, k_pos, cfg.block_q, cfg.block_k)
    layouts = _layouts(k_start, k_end, k_pos)
    # delta[b, n, t] = sum_h dO * O, lane-replicated like lse.
    delta = reference.softmax_delta(*(x.reshape(b, tp, n, cfg.head_dim) for x in (o, do)))
    delta = jnp.broadcast_to(delta[..., None], (b, n, tp, _LANES))
    operands = (q, k, v, do, lse, delta, *layouts)

    def run(kernel, q_major, first, last, out_shape, out_specs, scratch):
        q_spec, kv_spec, row_spec, qint_spec, kp_row_spec, kp_col_spec = _specs(cfg, nq, nk, q_major=q_major)
        steps = _walk_length(tab[first], tab[last])
        grid = (b, kvh, nq, steps) if q_major else (b, kvh, nk, steps)
        return pl.pallas_call(
            functools.partial(kernel, cfg=cfg, nq=nq, nk=nk),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2 + len(TABLES),
                grid=grid,
                in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                          qint_spec, qint_spec, kp_row_spec, kp_col_spec],
                out_specs=out_specs(q_spec, kv_spec),
                scratch_shapes=scratch,
            ),
            out_shape=out_shape,
            interpret=cfg.interpret,
            name=kernel.__name__.strip("_"),
            compiler_params=_compiler_params(),
        )(tab[first], tab[last], *(tab[name] for name in TABLES), *operands)

    dq = run(
        _dq_kernel, True, "j_first", "j_last",
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        lambda q_spec, kv_spec: q_spec,
        [pltpu.VMEM((cfg.groups, cfg.block_q, cfg.head_dim), jnp.float32)],
    )
    dk, dv = run(
        _dkv_kernel, False, "i_first", "i_last",
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        lambda q_spec, kv_spec: [kv_spec, kv_spec],
        [pltpu.VMEM((cfg.block_k, cfg.head_dim), jnp.float32)] * 2,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, k_start, k_end, k_pos, cfg: _Config):
    return _forward(q, k, v, k_start, k_end, k_pos, cfg)[0]


def _flash_fwd(q, k, v, k_start, k_end, k_pos, cfg):
    o, lse = _forward(q, k, v, k_start, k_end, k_pos, cfg)
    return o, (q, k, v, o, lse, k_start, k_end, k_pos)


def _flash_bwd(cfg, res, do):
    q, k, v, o, lse, k_start, k_end, k_pos = res
    dq, dk, dv = _backward(q, k, v, o, lse, do, k_start, k_end, k_pos, cfg)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------- entry point


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
    block_q: int = 128,
    block_k: int = 128,
    interpret: Any = False,
) -> jax.Array:
    """Flash attention of q [B, T, N, H] over k, v [B, S, K, H] restricted to per-query key intervals.

    Matches `kernels.reference.attention` (see there), differentiable in q, k, v.
    Slots with k_pos <= -2**30 are empty (never visible; their K/V may hold NaN).
    block_q: multiple of 16; block_k: multiple of 128 (both shrink for short T / S).
    interpret: False (compile for TPU), True or a `pltpu.InterpretParams` (run on CPU).
    Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    if n % kvh:
        raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kvh})")
    if block_q % 16 or block_k % _LANES or block_q <= 0 or block_k <= 0:
        raise ValueError(f"block_q must be a multiple of 16 and block_k of 128; got {block_q}, {block_k}")
    if interpret is True:
        interpret = pltpu.InterpretParams()
    hp = blocks.round_up(h, _LANES)
    bq = min(block_q, blocks.round_up(t, 16))
    bk = min(block_k, blocks.round_up(s_len, _LANES))
    tp, sp = blocks.round_up(t, bq), blocks.round_up(s_len, bk)
    cfg = _Config(
        scale=float(scale), softcap=None if softcap is None else float(softcap), groups=n // kvh,
        head_dim=hp, block_q=bq, block_k=bk, interpret=interpret,
    )
    if k_pos is None:
        k_pos = jnp.broadcast_to(jnp.arange(s_len, dtype=jnp.int32), (b, s_len))
    # Empty slots must never be visible, whatever k_start says.
    k_start = jnp.maximum(k_start.astype(jnp.int32), EMPTY_POS + 1)
    k_end = k_end.astype(jnp.int32)
    k_start = jnp.pad(k_start, ((0, 0), (0, tp - t)), constant_values=1)  # padded queries: empty
    k_end = jnp.pad(k_end, ((0, 0), (0, tp - t)), constant_values=0)
    k_pos = jnp.pad(k_pos.astype(jnp.int32), ((0, 0), (0, sp - s_len)), constant_values=EMPTY_POS)
    q3 = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, hp - h))).reshape(b, tp, n * hp)
    k3 = jnp.pad(k, ((0, 0), (0, sp - s_len), (0, 0), (0, hp - h))).reshape(b, sp, kvh * hp)
    v3 = jnp.pad(v, ((0, 0), (0, sp - s_len), (0, 0), (0, hp - h))).reshape(b, sp, kvh * hp)
    o = _flash(q3, k3, v3, k_start, k_end, k_pos, cfg)
    return o.reshape(b, tp, n, hp)[:, :t, :, :h]
