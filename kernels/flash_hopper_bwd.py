"""Flash attention backward for Hopper GPUs: Pallas Mosaic GPU (wgmma, TMA, warp specialisation).

The backward of `flash_hopper.forward` for the shapes it serves (self-attention with key positions s,
bf16 or f16, head_dim a multiple of 64 up to 256, no soft-cap), from its logsumexp (log2 units, scale
folded in) and delta = rowsum(dO * O). Both kernels recompute P = exp2(S - lse) block by block:

dk/dv: a CTA per key block of 64 keys of one kv head. K_j and V_j stay in SMEM; a producer warpgroup
  streams, for each q head of the group and each query block i that meets the key block, Q_i, dO_i
  and their rows' lse, delta, k_start, k_end into a 2-slot ring. Warpgroup 0 accumulates
  dV_j += P^T dO_i, warpgroup 1 dK_j += dS^T Q_i with dS^T = P^T * (V_j dO_i^T - delta): one
  64 x 256 f32 accumulator fills a warpgroup's registers, hence one each. Both compute
  S^T = K_j Q_i^T (a 64 x 64 tile; cheaper than passing P through SMEM, and P stays f32).
dq: the forward's layout (a CTA per 128-row tile of a q head, two compute warpgroups of 64 rows with
  their own hulls, a producer streaming K/V blocks, here of 32 keys so that Q and dO of both
  warpgroups fit beside the ring): dQ_i += dS K_j with S = Q_i K_j^T and dP = dO_i V_j^T.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import blocks, reference
from kernels.flash_hopper import (_LOG2E, TILE, _hull_loops, _InterpretParams, _load_row, _mma, _scores, _visible,
                                  _work_item, tile_meta)

BLOCK = 64  # query rows per compute warpgroup; keys per dk/dv CTA
DQ_BLOCK_K = 32  # keys per dq ring slot: Q and dO of two warpgroups (128 KB at H = 256) leave room for 2 slots
STAGES = 2
_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
# dq: the dS K product contracts over a 32-key block, and wgmma's contraction groups are as wide as the
# swizzle (64 bytes: 32 elements); the operands of one wgmma share their swizzle, so all of dq's do
_TILED_DQ = (plgpu.TilingTransform((8, DQ_BLOCK_K)), plgpu.SwizzleTransform(2 * DQ_BLOCK_K))


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    groups: int  # q heads per kv head
    interpret: bool


def _spread(x, shape, axis):
    """A vector along `axis` of a WGMMA tile, broadcast to the tile."""
    return lax.broadcast_in_dim(x, shape, [axis])


# ----------------------------------------------------------------------------- dk, dv


def _dkdv_kernel(meta_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 scoped, *, cfg: _Config):
    (k_smem, v_smem, q_smem, do_smem, stat_smem, rows_smem, *a_smem), loaded, released, done = scoped
    kv_loaded, q_loaded, do_loaded, lse_loaded, delta_loaded, ks_loaded, ke_loaded = loaded
    staging = (lambda i: a_smem[0].at[i]) if a_smem else (lambda i: None)  # A operands in SMEM: interpret only
    wg = lax.axis_index("wg")
    nk, kv_heads = meta_ref.shape[2], k_ref.shape[2]
    h, dtype, bk, bq, g = q_ref.shape[-1], q_ref.dtype, BLOCK, BLOCK, cfg.groups
    cta = lax.axis_index("cta")  # key blocks vary fastest, then kv heads
    j = lax.rem(cta, jnp.int32(nk))
    c = lax.rem(lax.div(cta, jnp.int32(nk)), jnp.int32(kv_heads))
    b = lax.div(cta, jnp.int32(nk * kv_heads))
    first, end = meta_ref[b, 0, j], meta_ref[b, 1, j]  # query blocks that meet key block j
    per_head = end - first
    steps = g * per_head
    keys = (b, pl.ds(j * bk, bk), c)

    def step_rows(s):
        """Step s: (q head, query rows) of the ring's slot s % STAGES."""
        head = c * g + lax.div(s, jnp.maximum(per_head, 1))
        rows = pl.ds((first + lax.rem(s, jnp.maximum(per_head, 1))) * bq, bq)
        return head, rows

    @pl.when(wg == 2)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_loaded.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_loaded.at[1])

        @pl.loop(0, steps)
        def _(s):
            slot = lax.rem(s, jnp.int32(STAGES))
            head, rows = step_rows(s)
            pl.when(s >= STAGES)(lambda: plgpu.barrier_wait(released.at[slot]))  # both warpgroups done
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, head], q_smem.at[slot], q_loaded.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, head], do_smem.at[slot], do_loaded.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, head, rows], stat_smem.at[slot, 0], lse_loaded.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, head, rows], stat_smem.at[slot, 1], delta_loaded.at[slot])
            plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], rows_smem.at[slot, 0], ks_loaded.at[slot])
            plgpu.copy_gmem_to_smem(ke_ref.at[b, rows], rows_smem.at[slot, 1], ke_loaded.at[slot])

    col = plgpu.Layout.WGMMA.reduce(0)  # a vector along the query (column) axis of a [keys, queries] tile
    shape = (bk, bq)

    def probs_t(slot):
        """P^T [keys, queries] f32 of the step in `slot`: exp2(S^T - lse) where the query sees the key, else 0."""
        plgpu.barrier_wait(q_loaded.at[slot])
        plgpu.barrier_wait(lse_loaded.at[slot])
        plgpu.barrier_wait(ks_loaded.at[slot])
        plgpu.barrier_wait(ke_loaded.at[slot])
        s_t = _scores(k_smem, q_smem.at[slot], shape) * (cfg.scale * _LOG2E)
        k_start, k_end = (_load_row(rows_smem.at[slot], r, col) for r in range(2))
        s_t = _visible(s_t, j * bk, k_start, k_end, key_axis=0)
        return jnp.exp2(s_t - _spread(_load_row(stat_smem.at[slot], 0, col), shape, 1))

    def release(slot):
        plgpu.commit_smem()  # the rows were read by plain loads: order them before the next TMA write
        plgpu.barrier_arrive(released.at[slot])

    def finish(acc, buf, out_ref):
        plgpu.barrier_arrive(done)  # both warpgroups are past their last read of K_j and V_j
        plgpu.barrier_wait(done)
        buf[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, out_ref.at[keys])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the kernel's end: SMEM read out suffices

    def compute(update, buf, out_ref, factor: float):
        """Runs this warpgroup's steps, acc = update(slot, P^T, acc), and writes factor * acc through buf."""
        plgpu.set_max_registers(232, action="increase")
        plgpu.barrier_wait(kv_loaded.at[0])
        plgpu.barrier_wait(kv_loaded.at[1])

        def step(s, acc):
            slot = lax.rem(s, jnp.int32(STAGES))
            p_t = probs_t(slot)
            plgpu.barrier_wait(do_loaded.at[slot])
            acc = update(slot, p_t, acc)
            release(slot)
            return acc

        acc = plgpu.layout_cast(jnp.zeros((bk, h), jnp.float32), plgpu.Layout.WGMMA)
        finish(lax.fori_loop(0, steps, step, acc) * factor, buf, out_ref)

    @pl.when(wg == 0)
    def _dv():
        def update(slot, p_t, acc):  # dV += P^T dO
            return _mma(acc, p_t.astype(dtype), do_smem.at[slot], staging(0), cfg.interpret)

        compute(update, v_smem, dv_ref, 1.0)  # dV leaves through V's buffer

    @pl.when(wg == 1)
    def _dk():
        def update(slot, p_t, acc):  # dK += dS^T Q, dS^T = P^T (V dO^T - delta)
            plgpu.barrier_wait(delta_loaded.at[slot])
            dp_t = _scores(v_smem, do_smem.at[slot], shape)
            ds_t = p_t * (dp_t - _spread(_load_row(stat_smem.at[slot], 1, col), shape, 1))
            return _mma(acc, ds_t.astype(dtype), q_smem.at[slot], staging(1), cfg.interpret)

        compute(update, k_smem, dk_ref, cfg.scale)  # dK = scale dS^T Q leaves through K's buffer


# ----------------------------------------------------------------------------- dq


def _dq_kernel(meta_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped, *,
               cfg: _Config):
    (q_smem2, do_smem2, k_smem, v_smem, rows_smem, stat_smem, *a_smem), loaded, released = scoped
    k_loaded, v_loaded, q_loaded, do_loaded, ks_loaded, ke_loaded, lse_loaded, delta_loaded = loaded
    staging = (lambda i: a_smem[0].at[i]) if a_smem else (lambda i: None)  # A operands in SMEM: interpret only
    wg = lax.axis_index("wg")
    heads, tiles = q_ref.shape[2], meta_ref.shape[2]
    h, dtype, bq, bk = q_ref.shape[-1], q_ref.dtype, BLOCK, DQ_BLOCK_K
    b, n, tile = _work_item(lax.axis_index("cta"), heads, tiles)  # one item per CTA, as the forward's
    lo, hi = meta_ref[b, 0, tile], meta_ref[b, 1, tile]
    steps = hi - lo

    def slot_of(i):
        return lax.rem(i, jnp.int32(STAGES))

    @pl.when(wg == 2)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")

        @pl.loop(0, steps)
        def _(i):
            slot = slot_of(i)
            keys = (b, pl.ds((lo + i) * bk, bk), lax.div(n, jnp.int32(cfg.groups)))
            pl.when(i >= STAGES)(lambda: plgpu.barrier_wait(released.at[slot]))  # both warpgroups done
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        hull = tuple(meta_ref[b, 2 + 4 * wg + r, tile] for r in range(4))  # this warpgroup's (first, a, b, end)
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        rows = pl.ds(tile * TILE + wg * bq, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_smem, q_loaded.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, n], do_smem, do_loaded.at[wg])
        plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], rows_smem.at[wg, 0], ks_loaded.at[wg])
        plgpu.copy_gmem_to_smem(ke_ref.at[b, rows], rows_smem.at[wg, 1], ke_loaded.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, n, rows], stat_smem.at[wg, 0], lse_loaded.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, n, rows], stat_smem.at[wg, 1], delta_loaded.at[wg])
        for barrier in (ks_loaded, ke_loaded, lse_loaded, delta_loaded, q_loaded, do_loaded):
            plgpu.barrier_wait(barrier.at[wg])
        row = plgpu.Layout.WGMMA.reduce(1)
        shape = (bq, bk)
        k_start, k_end = (_load_row(rows_smem.at[wg], r, row) for r in range(2))
        lse, delta = (_load_row(stat_smem.at[wg], r, row) for r in range(2))

        def step(i, acc, masked: bool):
            slot = slot_of(i)
            plgpu.barrier_wait(k_loaded.at[slot])
            s = _scores(q_smem, k_smem.at[slot], shape) * (cfg.scale * _LOG2E)
            if masked:
                s = _visible(s, (lo + i) * bk, k_start, k_end, key_axis=1)
            p = jnp.exp2(s - _spread(lse, shape, 0))
            plgpu.barrier_wait(v_loaded.at[slot])
            ds = p * (_scores(do_smem, v_smem.at[slot], shape) - _spread(delta, shape, 0))
            acc = _mma(acc, ds.astype(dtype), k_smem.at[slot], staging(wg), cfg.interpret)
            plgpu.barrier_arrive(released.at[slot])
            return acc

        def idle(i, acc):  # a block of the other warpgroup's hull only
            slot = slot_of(i)
            plgpu.barrier_wait(k_loaded.at[slot])
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_arrive(released.at[slot])
            return acc

        acc = plgpu.layout_cast(jnp.zeros((bq, h), jnp.float32), plgpu.Layout.WGMMA)
        acc = _hull_loops(lo, steps, hull, functools.partial(step, masked=True), functools.partial(step, masked=False),
                          idle, acc)
        q_smem[...] = (acc * cfg.scale).astype(dtype)  # dQ leaves through Q's buffer
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, n])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the kernel's end: SMEM read out suffices


# ----------------------------------------------------------------------------- entry point


def backward(q, k, v, o, lse, do, k_start, k_end, *, scale: float, interpret: bool = False):
    """Gradients of flash_hopper.forward: q, k, v [B, T, N|K, H] (T a multiple of 128), o, do [B, T, N, H],
    lse [B, N, T] (the forward's, log2 units), k_start, k_end [B, T] int32 -> dq, dk, dv.

    interpret: run in Mosaic GPU interpret mode, with its race detector on.
    """
    bsz, t, n, h = q.shape
    kv_heads = k.shape[2]
    if t % TILE:
        raise ValueError(f"flash_hopper_bwd.backward needs T a multiple of {TILE}; got {t}")
    cfg = _Config(scale=float(scale), groups=n // kv_heads, interpret=interpret)
    delta = reference.softmax_delta(o, do)
    k_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (bsz, t))
    common = dict(
        num_threads=3,
        thread_name="wg",
        # the row reductions stay within warps: no SMEM scratch for cross-warp ones
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        **({"interpret": _InterpretParams(detect_races=True)} if interpret else {}),
    )
    # dk, dv: per key block the query blocks that meet it, [first, end)
    *_, meets = blocks.hulls(k_start, k_end, k_pos, BLOCK, BLOCK)
    q_first, q_last = blocks.first_last(meets, axis=1)
    kmeta = jnp.stack([q_first, q_last + 1], axis=1).astype(jnp.int32)  # [B, 2, T / 64]

    def dkdv_entry(*refs):
        smem = (
            plgpu.SMEM((BLOCK, h), k.dtype, transforms=_TILED),  # K_j, then dK_j
            plgpu.SMEM((BLOCK, h), v.dtype, transforms=_TILED),  # V_j, then dV_j
            plgpu.SMEM((STAGES, BLOCK, h), q.dtype, transforms=_TILED),
            plgpu.SMEM((STAGES, BLOCK, h), do.dtype, transforms=_TILED),
            plgpu.SMEM((STAGES, 2, BLOCK), jnp.float32),  # lse, delta of the slot's rows
            plgpu.SMEM((STAGES, 2, BLOCK), jnp.int32),  # k_start, k_end of the slot's rows
        )
        if interpret:
            smem += (plgpu.SMEM((2, BLOCK, BLOCK), q.dtype, transforms=_TILED),)
        loaded = (plgpu.Barrier(num_barriers=2),) + tuple(plgpu.Barrier(num_barriers=STAGES) for _ in range(6))
        pl.run_scoped(
            lambda *scoped: _dkdv_kernel(*refs, scoped, cfg=cfg),
            smem,
            loaded,
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # a slot free again
            plgpu.Barrier(num_arrivals=2),  # both warpgroups done with K_j, V_j
            collective_axes="wg",
        )

    dk, dv = plgpu.kernel(
        dkdv_entry,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(bsz * kv_heads * (t // BLOCK),),
        grid_names=("cta",),
        **common,
    )(kmeta, k_start, k_end, q, k, v, do, lse, delta)

    def dq_entry(*refs):
        smem = (
            plgpu.SMEM((2, BLOCK, h), q.dtype, transforms=_TILED_DQ),  # Q per warpgroup, then dQ
            plgpu.SMEM((2, BLOCK, h), do.dtype, transforms=_TILED_DQ),
            plgpu.SMEM((STAGES, DQ_BLOCK_K, h), k.dtype, transforms=_TILED_DQ),
            plgpu.SMEM((STAGES, DQ_BLOCK_K, h), v.dtype, transforms=_TILED_DQ),
            plgpu.SMEM((2, 2, BLOCK), jnp.int32),  # per warpgroup its rows' k_start, k_end
            plgpu.SMEM((2, 2, BLOCK), jnp.float32),  # per warpgroup its rows' lse, delta
        )
        if interpret:
            smem += (plgpu.SMEM((2, BLOCK, DQ_BLOCK_K), q.dtype, transforms=_TILED_DQ),)
        loaded = tuple(plgpu.Barrier(num_barriers=STAGES) for _ in range(2)) + tuple(
            plgpu.Barrier(num_barriers=2) for _ in range(6))
        pl.run_scoped(
            lambda *scoped: _dq_kernel(*refs, scoped, cfg=cfg),
            smem,
            loaded,
            plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # a K/V slot free again
            collective_axes="wg",
        )

    qmeta = tile_meta(k_start, k_end, BLOCK, DQ_BLOCK_K)
    dq = plgpu.kernel(
        dq_entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(bsz * n * (t // TILE),),
        grid_names=("cta",),
        **common,
    )(qmeta, k_start, k_end, q, k, v, do, lse, delta)
    return dq, dk, dv
