"""Flash attention forward for Hopper GPUs: Pallas Mosaic GPU (wgmma, TMA, warp specialisation).

Serves the prefill / training shape: self-attention (S == T) with key positions s, bf16 or f16,
head_dim a multiple of 64 up to 256, no soft-cap. `flash_gpu` routes that shape here on a Hopper
GPU and keeps its Triton kernels for the rest. Either backward (`flash_hopper_bwd`, the default there,
or Triton's) reads this forward's logsumexp (same layout and units: [B, N, T] f32, log2, scale folded in).

A work item is a tile of 2 * bq query rows of one q head (paired: bq rows of two q heads); a CTA
serves one item (or, persistent, every `ctas`-th: then each warpgroup loads the next item's Q once its
last S = Q K^T is done, and O leaves through a buffer of its own that the two warpgroups take in
turns), with three warpgroups:
  two compute warpgroups, bq rows each: S = Q K^T and O += P V on the tensor cores (wgmma), the
    online softmax in registers; they take turns on the tensor cores (a shared schedule barrier);
  one producer warpgroup: streams the tile's K and V blocks by TMA into a ring of `stages` slots
    and refills a slot once both compute warpgroups have released it.
The producer streams the key blocks of the tile's hull; each compute warpgroup computes those of its
own rows' hull [first, end) (read as scalars from a small [B, 10, tiles] table that
`blocks.contiguous_ranges` derives from the intervals in O(T)) and passes the others idle; the blocks
in [a, b) lie inside every row's interval and skip the per-element mask. On a sliding window of
W = 1024 with 64-key blocks that is 17 blocks per warpgroup of which 2 masked, against 18 and 4 for
the 128-row tile as a whole. Paired (an option for GQA), a tile is bq rows of two q heads of one kv
head instead, a head per warpgroup: one hull, no idle block, each K/V block streamed serving 2 bq rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import blocks

try:
    _InterpretParams = plgpu.InterpretGPUParams
except AttributeError:  # jax < 0.11 has it, unexported
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _InterpretParams

_LOG2E = math.log2(math.e)
BLOCK_Q = 64  # rows per compute warpgroup (one wgmma M tile)
BLOCK_K = 64  # keys per pipeline slot: with H = 256 two slots of K and V and the Q tile fill ~192 KB
STAGES = 2
TILE = 2 * BLOCK_Q  # query rows per CTA


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    groups: int  # q heads per kv head
    ctas: int  # CTAs launched; each serves work items cta, cta + ctas, ... of B * N * T / TILE
    persistent: bool  # ctas < items: Q of the next item streams in while the current one ends
    paired: bool = False  # a tile is block_q rows of two q heads of one kv head, a head per warpgroup
    block_q: int = BLOCK_Q
    block_k: int = BLOCK_K
    stages: int = STAGES
    interpret: bool = False


def serves(q: jax.Array, k: jax.Array, softcap, k_pos) -> bool:
    """Whether this kernel computes the call: self-attention with key positions s, bf16 or f16,
    head_dim a multiple of 64 up to 256, no soft-cap."""
    return (
        k_pos is None
        and softcap is None
        and q.shape[1] == k.shape[1]
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 64 == 0
        and q.shape[-1] <= 256
    )


def compute_capability() -> float:
    """The default device's CUDA compute capability (9.0 on Hopper); 0 off a GPU."""
    device = jax.devices()[0]
    return float(getattr(device, "compute_capability", None) or 0) if device.platform == "gpu" else 0.0


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x)."""
    return 9 <= compute_capability() < 10


def tile_meta(k_start, k_end, block_q: int, block_k: int, *, paired: bool = False) -> jax.Array:
    """int32 [B, 10, tiles]: per query tile of the two compute warpgroups the key blocks [lo, hi) the
    producer streams (rows 0, 1), and for warpgroup w (rows 2 + 4w ...) the blocks of its own hull
    within them, (first, a, b, end): masked [first, a), unmasked [a, b) (inside every row's interval),
    masked [b, end). The warpgroup passes the blocks of [lo, hi) outside [first, end) idle. Keys sit at
    positions 0 .. T-1. A tile is 2 block_q rows (the warpgroups take one half each), or, paired,
    block_q rows that both warpgroups take (for two q heads): then both hulls are the tile's."""
    bsz, t = k_start.shape
    ranges = blocks.contiguous_ranges(k_start, k_end, block_q, block_k, t // block_k)
    own = [x.reshape(bsz, -1, 1 if paired else 2) for x in blocks.split(*ranges)]  # [B, tiles, row groups]
    busy = own[3] > own[0]
    lo = jnp.where(busy, own[0], blocks.BIG).min(-1)
    hi = jnp.where(busy, own[3], -blocks.BIG).max(-1)
    lo, hi = jnp.where(busy.any(-1), lo, 0), jnp.where(busy.any(-1), hi, 0)
    own = [jnp.where(busy, x, lo[..., None]) for x in own]  # an idle row group: [lo, lo)
    wg_rows = [x[..., min(w, x.shape[-1] - 1)] for w in range(2) for x in own]
    return jnp.stack([lo, hi, *wg_rows], axis=1).astype(jnp.int32)


def _load_row(ref, i, layout):
    """ref[i] of a 2-D SMEM ref, in registers of `layout` (jax < 0.11 spells the index out)."""
    try:
        return plgpu.load(ref.at[i], layout=layout)
    except TypeError:
        return plgpu.load(ref.at[i], (), layout=layout)


def _work_item(idx, heads: int, tiles: int):
    """(b, n, tile) of work item idx over B x `heads` x `tiles` (heads: q heads, or head pairs when
    paired), heads varying fastest."""
    n = lax.rem(idx, jnp.int32(heads))
    tile = lax.rem(lax.div(idx, jnp.int32(heads)), jnp.int32(tiles))
    return lax.div(idx, jnp.int32(heads * tiles)), n, tile


def _scores(a_ref, b_ref, shape, during=lambda: None):
    """a_ref @ b_ref^T (both [rows, H] in SMEM) -> f32 `shape` in registers, on the tensor cores;
    `during` runs while they work."""

    def scoped(ref):
        plgpu.wgmma(ref, a_ref, b_ref.transpose((1, 0)))
        during()
        return ref[...]

    return pl.run_scoped(scoped, plgpu.ACC(shape, jnp.float32))


def _mma(acc, a, b_ref, a_smem, interpret: bool, during=lambda: None):
    """acc + a @ b_ref on the tensor cores: a [M, K] in registers, b_ref [K, N] in SMEM, acc [M, N] f32;
    `during` runs while they work. a_smem: a [M, K] SMEM buffer for interpret mode, whose wgmma takes A
    from SMEM only and starts from zero."""
    if interpret:
        a_smem[...] = a

        def scoped(ref):
            plgpu.wgmma(ref, a_smem, b_ref)
            during()
            return ref[...]

        return acc + pl.run_scoped(scoped, plgpu.ACC(acc.shape, jnp.float32))

    def update(ref):
        plgpu.wgmma(ref, a, b_ref)
        during()

    return pl.run_state(update)(plgpu.ACC.init(acc))


def _visible(s, first_key: jax.Array, k_start, k_end, key_axis: int):
    """s where the key (position first_key + its index along key_axis) lies in its query's interval
    [k_start, k_end] (vectors along the other axis), else -inf."""
    pos = first_key + plgpu.broadcasted_iota(jnp.int32, s.shape, key_axis, layout=plgpu.Layout.WGMMA)
    lower, upper = (lax.broadcast_in_dim(x, s.shape, [1 - key_axis]) for x in (k_start, k_end))
    return jnp.where((pos >= lower) & (pos <= upper), s, -jnp.inf)


def _hull_loops(lo, steps, hull, masked, whole, idle, carry):
    """A warpgroup's steps over its tile's key blocks [lo, lo + steps), with its own hull
    (first, a, b, end): idle before first and from end on, masked in [first, a) and [b, end), whole
    in [a, b). Each body takes (step index from 0, carry)."""
    first, a, b, end = hull
    for start, stop, body in ((lo, first, idle), (first, a, masked), (a, b, whole), (b, end, masked),
                              (end, lo + steps, idle)):
        carry = lax.fori_loop(start - lo, stop - lo, body, carry)
    return carry


def _kernel(meta_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, *, cfg: _Config):
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    (q_smem2, k_smem, v_smem, rows_smem, lse_smem2, *extra), loaded, released, schedule = scoped
    o_shared = extra.pop(0) if cfg.persistent else None  # O out (persistent: Q's buffer takes the next Q)
    p_smem2 = extra.pop(0) if cfg.interpret else None  # P staged in SMEM: interpret mode only
    k_loaded, v_loaded, q_loaded, ks_loaded, ke_loaded, *o_free = loaded
    o_free = o_free[0] if o_free else None  # persistent: o_free[w], warpgroup w may write the O buffer
    k_released, v_released = released
    bq, bk, stages = cfg.block_q, cfg.block_k, cfg.stages
    batch, heads, tiles = meta_ref.shape[0], q_ref.shape[2], meta_ref.shape[2]
    units = heads // 2 if cfg.paired else heads  # head pairs, or heads, per row tile
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype
    my_items = lax.div(batch * units * tiles - cta + cfg.ctas - 1, jnp.int32(cfg.ctas))

    def item(j):
        """Work item j of this CTA: (b, n, tile, lo, hi); paired, n is the pair's first q head."""
        b, n, tile = _work_item(cta + j * cfg.ctas, units, tiles)
        return b, n * 2 if cfg.paired else n, tile, meta_ref[b, 0, tile], meta_ref[b, 1, tile]

    def rows_of(tile):
        """(q head offset within the item, first row) of this warpgroup's part of a tile."""
        return (wg, tile * bq) if cfg.paired else (0, tile * (2 * bq) + wg * bq)

    def slot_of(g):
        return lax.rem(g, jnp.int32(stages))

    def take_turn():  # the two compute warpgroups alternate on the tensor cores
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        o_smem = o_shared if cfg.persistent else q_smem  # one item per CTA: O leaves through Q's buffer
        row = plgpu.Layout.WGMMA.reduce(1)

        def fetch(j):
            """Issues the loads of item j's Q rows and their intervals (this warpgroup's bq rows)."""
            b, n, tile, *_ = item(j)
            dn, row0 = rows_of(tile)
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), n + dn], q_smem, q_loaded.at[wg])
            plgpu.copy_gmem_to_smem(ks_ref.at[b, pl.ds(row0, bq)], rows_smem.at[wg, 0], ks_loaded.at[wg])
            plgpu.copy_gmem_to_smem(ke_ref.at[b, pl.ds(row0, bq)], rows_smem.at[wg, 1], ke_loaded.at[wg])

        def one_item(j, g0):
            """Computes item j; g0 counts the K/V blocks this CTA consumed before it (ring slot = g % stages)."""
            b, n, tile, lo, hi = item(j)
            first, a, b_, end = (meta_ref[b, 2 + 4 * wg + r, tile] for r in range(4))  # this warpgroup's
            steps = hi - lo
            dn, row0 = rows_of(tile)
            if not cfg.persistent:
                fetch(j)

            def prefetch_next():  # persistent: Q and the rows are read, so item j + 1's may land
                @pl.when(j + 1 < my_items)
                def _():
                    plgpu.commit_smem()  # every thread of the warpgroup is past its reads of Q and the rows
                    fetch(j + 1)

            plgpu.barrier_wait(ks_loaded.at[wg])
            plgpu.barrier_wait(ke_loaded.at[wg])
            k_start, k_end = _load_row(rows_smem.at[wg], 0, row), _load_row(rows_smem.at[wg], 1, row)
            plgpu.barrier_wait(q_loaded.at[wg])
            if cfg.persistent:
                pl.when(first == end)(prefetch_next)  # no block to compute

            acc = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row)
            l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row)

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_loaded.at[slot_of(g0)])

            pl.when(wg == 1)(take_turn)

            def wait_next_k(i):
                @pl.when(i + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_loaded.at[slot_of(g0 + i + 1)])

            def step(i, carry, masked: bool):
                acc, m, l = carry
                slot = slot_of(g0 + i)
                s = _scores(q_smem, k_smem.at[slot], (bq, bk), during=take_turn)
                plgpu.barrier_arrive(k_released.at[slot])
                if cfg.persistent:
                    pl.when(lo + i == end - 1)(prefetch_next)  # the next Q streams in under the rest
                s = s * (cfg.scale * _LOG2E)  # logits in log2 units
                if masked:
                    s = _visible(s, (lo + i) * bk, k_start, k_end, key_axis=1)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new  # nothing visible yet
                alpha = jnp.exp2(m - m_safe)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(schedule)  # softmax done
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_wait(schedule)  # the tensor cores are ours
                l = l * alpha + p.sum(axis=1)
                p_smem = None if p_smem2 is None else p_smem2.at[wg]
                acc = _mma(acc, p16, v_smem.at[slot], p_smem, cfg.interpret, during=lambda: wait_next_k(i))
                plgpu.barrier_arrive(v_released.at[slot])
                return acc, m_new, l

            def idle(i, carry):  # a block of the other warpgroup's hull only: the protocol, no math
                slot = slot_of(g0 + i)
                take_turn()
                plgpu.barrier_arrive(k_released.at[slot])
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_wait(schedule)
                wait_next_k(i)
                plgpu.barrier_arrive(v_released.at[slot])
                return carry

            acc, m, l = _hull_loops(lo, steps, (first, a, b_, end), functools.partial(step, masked=True),
                                    functools.partial(step, masked=False), idle, (acc, m, l))
            pl.when(wg == 0)(take_turn)

            empty = l == 0.0
            l_safe = jnp.where(empty, 1.0, l)
            out = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
            if cfg.persistent:  # the warpgroups take turns on the one O buffer: 0, 1, 0, 1, ...
                pl.when((wg == 1) | (j > 0))(lambda: plgpu.barrier_wait(o_free.at[wg]))
            o_smem[...] = out
            lse_smem[...] = jnp.where(empty, 0.0, m + jnp.log2(l_safe))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[b, pl.ds(row0, bq), n + dn])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, n + dn, pl.ds(row0, bq)])
            if cfg.persistent:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the buffers are read: the other may write
                plgpu.barrier_arrive(o_free.at[1 - wg])
            else:  # the kernel's end: SMEM must be read out; the writes land by the grid's end
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            return g0 + steps

        if cfg.persistent:
            fetch(0)
        lax.fori_loop(0, my_items, one_item, jnp.int32(0))
        if cfg.persistent:
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == 2)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")

        def one_item(j, g0):
            b, n, _, lo, hi = item(j)
            kv_head = lax.div(n, jnp.int32(cfg.groups))

            @pl.loop(0, hi - lo)
            def _(i):
                g = g0 + i
                slot = slot_of(g)
                keys = (b, pl.ds((lo + i) * bk, bk), kv_head)
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(k_released.at[slot]))  # both warpgroups done
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_loaded.at[slot])
                pl.when(g >= stages)(lambda: plgpu.barrier_wait(v_released.at[slot]))
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_loaded.at[slot])

            return g0 + hi - lo

        lax.fori_loop(0, my_items, one_item, jnp.int32(0))


def forward(q, k, v, k_start, k_end, *, scale: float, ctas: int | None = None, paired: bool = False,
            interpret: bool = False):
    """q, k, v [B, T, N|K, H] (T a multiple of 2 * BLOCK_Q), k_start, k_end [B, T] int32 ->
    (o [B, T, N, H], lse [B, N, T] f32 in log2 units; 0 for rows that see nothing).

    ctas: CTAs to launch. Default: one per work item (a query tile of one head). Fewer makes the
    kernel persistent: a CTA serves several items, its producer streams the next item's K/V and
    its compute warpgroups the next Q while they finish the current one (the number of SMs is the
    natural choice). paired: a tile is BLOCK_Q rows of two q heads of one kv head (the group size
    must be even), a head per compute warpgroup: both warpgroups then share one hull, with no idle
    steps, and each K/V block streamed serves twice the rows. interpret: run in Mosaic GPU interpret
    mode, with its race detector on.
    """
    bsz, t, n, h = q.shape
    groups = n // k.shape[2]
    if t % TILE:
        raise ValueError(f"flash_hopper.forward needs T a multiple of {TILE}; got {t}")
    if paired and groups % 2:
        raise ValueError(f"paired=True needs an even number of q heads per kv head; got {groups}")
    items = bsz * n * (t // TILE)  # paired: B x N/2 head pairs x T/BLOCK_Q tiles, as many
    ctas = min(ctas or items, items)
    cfg = _Config(scale=float(scale), groups=groups, ctas=ctas, persistent=ctas < items, paired=paired,
                  interpret=interpret)
    meta = tile_meta(k_start, k_end, cfg.block_q, cfg.block_k, paired=cfg.paired)
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(meta_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        smem = (
            plgpu.SMEM((2, cfg.block_q, h), q.dtype, transforms=tiled),  # Q in (one item per CTA: O out too)
            plgpu.SMEM((cfg.stages, cfg.block_k, h), k.dtype, transforms=tiled),
            plgpu.SMEM((cfg.stages, cfg.block_k, h), v.dtype, transforms=tiled),
            plgpu.SMEM((2, 2, cfg.block_q), jnp.int32),  # per warpgroup its rows' k_start, k_end
            plgpu.SMEM((2, cfg.block_q), jnp.float32),
        )
        if cfg.persistent:  # H = 256: 64 KB Q + 32 KB O + 128 KB K/V ring, within the 227 KB of SMEM
            smem += (plgpu.SMEM((cfg.block_q, h), q.dtype, transforms=tiled),)
        if interpret:
            smem += (plgpu.SMEM((2, cfg.block_q, cfg.block_k), q.dtype, transforms=tiled),)
        loaded = (
            plgpu.Barrier(num_barriers=cfg.stages),  # K slot filled
            plgpu.Barrier(num_barriers=cfg.stages),  # V slot filled
            plgpu.Barrier(num_barriers=2),  # Q, per compute warpgroup
            plgpu.Barrier(num_barriers=2),  # k_start rows
            plgpu.Barrier(num_barriers=2),  # k_end rows
        ) + ((plgpu.Barrier(num_barriers=2),) if cfg.persistent else ())  # O buffer free for warpgroup w
        released = (plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages),) * 2  # K, V slot free again
        pl.run_scoped(
            lambda *scoped: _kernel(meta_ref, ks_ref, ke_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped, cfg=cfg),
            smem,
            loaded,
            released,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    call = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bsz, n, t), jnp.float32)),
        grid=(cfg.ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        # the row reductions stay within warps: no SMEM scratch for cross-warp ones (2 KB more for Q and O)
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        **({"interpret": _InterpretParams(detect_races=True)} if interpret else {}),  # jax 0.12 raises on a race
    )
    return call(meta, k_start, k_end, q, k, v)
