"""Block-level view of per-query key intervals, shared by the Pallas kernels (small XLA reductions).

A query block's hull is [min k_start, max k_end] over its non-empty rows; a key
block's hull is [min k_pos, max k_pos] over its filled slots (k_pos > EMPTY). Two
blocks can hold a visible pair only if their hulls meet; every kernel skips the
rest. No T x S mask is ever built: the table is [B, T/bq, S/bk].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EMPTY = -(2**30)  # k_pos of an unused cache slot or a padding key: outside every interval
BIG = 2**31 - 1


def query_hulls(k_start: jax.Array, k_end: jax.Array, block_q: int):
    """Per query block of block_q rows, int [B, T/bq] each: the union of its non-empty rows' intervals,
    [lo, hi] (inverted, (BIG, -BIG), when every row is empty), and the keys every row sees, [in_lo, in_hi]
    (max k_start, min k_end: an empty row inverts it)."""
    b, t = k_start.shape
    rows = lambda x: x.reshape(b, t // block_q, block_q)  # noqa: E731
    nonempty = k_start <= k_end
    lo = rows(jnp.where(nonempty, k_start, BIG)).min(-1)
    hi = rows(jnp.where(nonempty, k_end, -BIG)).max(-1)
    return lo, hi, rows(k_start).max(-1), rows(k_end).min(-1)


def hulls(k_start: jax.Array, k_end: jax.Array, k_pos: jax.Array, block_q: int, block_k: int):
    """k_start, k_end [B, T], k_pos [B, S] (T % block_q == S % block_k == 0) ->
    q_lo, q_hi [B, T/bq]; k_lo, k_hi [B, S/bk]; meets bool [B, T/bq, S/bk].
    A block with no non-empty row (filled slot) has an inverted hull and meets nothing."""
    b, s = k_pos.shape
    q_lo, q_hi, *_ = query_hulls(k_start, k_end, block_q)
    filled = k_pos > EMPTY
    k_lo = jnp.where(filled, k_pos, BIG).reshape(b, s // block_k, block_k).min(-1)
    k_hi = jnp.where(filled, k_pos, -BIG).reshape(b, s // block_k, block_k).max(-1)
    meets = (q_lo[:, :, None] <= k_hi[:, None, :]) & (q_hi[:, :, None] >= k_lo[:, None, :])
    return q_lo, q_hi, k_lo, k_hi, meets


def inside_hulls(k_start: jax.Array, k_end: jax.Array, k_pos: jax.Array, block_q: int, block_k: int):
    """Per query block the keys every row sees, [in_lo, in_hi] [B, T/bq] (max k_start, min k_end: an
    empty row inverts it); per key block the range of all its positions, [all_lo, all_hi] [B, S/bk]
    ((BIG, BIG) when a slot is empty, so it is inside nothing). Query block i sees key block j whole
    iff in_lo[i] <= all_lo[j] and all_hi[j] <= in_hi[i]."""
    b, s = k_pos.shape
    *_, in_lo, in_hi = query_hulls(k_start, k_end, block_q)
    slots = k_pos.reshape(b, s // block_k, block_k)
    filled = jnp.all(slots > EMPTY, axis=-1)
    return in_lo, in_hi, jnp.where(filled, slots.min(-1), BIG), jnp.where(filled, slots.max(-1), BIG)


def inside(k_start: jax.Array, k_end: jax.Array, k_pos: jax.Array, block_q: int, block_k: int) -> jax.Array:
    """bool [B, T/bq, S/bk]: every row of the query block sees every slot of the key block (all slots
    filled, all rows non-empty), so a kernel may skip the per-element test there."""
    in_lo, in_hi, all_lo, all_hi = inside_hulls(k_start, k_end, k_pos, block_q, block_k)
    return (in_lo[:, :, None] <= all_lo[:, None, :]) & (all_hi[:, None, :] <= in_hi[:, :, None])


def contiguous_ranges(k_start: jax.Array, k_end: jax.Array, block_q: int, block_k: int, key_blocks: int):
    """first_last of `hulls`' meets and of `inside` along the key blocks when the keys sit at positions
    0, 1, ... (k_pos = s, key_blocks * block_k of them), in O(T) instead of over a [B, T/bq, S/bk] table:
    per query block of block_q rows the key blocks it meets, [first, last], and those inside every row's
    interval, [in_first, in_last], int32 [B, T/bq] each, (0, -1) where there is none. Key block j holds
    positions [j bk, j bk + bk - 1]: it meets [lo, hi] iff lo // bk <= j <= hi // bk, and it lies inside
    [in_lo, in_hi] iff ceil(in_lo / bk) <= j <= (in_hi + 1) // bk - 1."""
    edge = key_blocks * block_k
    # clipped to just outside the keys, where the block arithmetic cannot overflow int32
    lo, hi, in_lo, in_hi = (jnp.clip(x, -block_k, edge) for x in query_hulls(k_start, k_end, block_q))

    def within(first, last):
        first, last = jnp.maximum(first, 0), jnp.minimum(last, key_blocks - 1)
        has = first <= last
        return jnp.where(has, first, 0).astype(jnp.int32), jnp.where(has, last, -1).astype(jnp.int32)

    return (*within(lo // block_k, hi // block_k), *within(-(-in_lo // block_k), (in_hi + 1) // block_k - 1))


def split(first, last, in_first, in_last):
    """A loop over blocks [first, last] whose blocks [in_first, in_last] need no mask, as the three
    ranges (first, a, b, end): masked [first, a), unmasked [a, b), masked [b, end). Works on arrays
    (XLA) and on scalars inside a kernel alike; an empty inside range (in_first > in_last) leaves the
    whole loop masked."""
    end = last + 1
    has = in_first <= in_last
    return first, jnp.where(has, in_first, end), jnp.where(has, in_last + 1, end), end


def first_last(mask: jax.Array, axis: int, none: tuple[int, int] = (0, -1)) -> tuple[jax.Array, jax.Array]:
    """First and last True index of bool `mask` along `axis` (int32); `none` where there is none."""
    n = mask.shape[axis]
    first = jnp.argmax(mask, axis=axis)
    last = n - 1 - jnp.argmax(jnp.flip(mask, axis), axis=axis)
    any_ = jnp.any(mask, axis=axis)
    return (jnp.where(any_, first, none[0]).astype(jnp.int32), jnp.where(any_, last, none[1]).astype(jnp.int32))


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(x - 1, 0).bit_length()
