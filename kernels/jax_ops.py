"""jax's own attention kernels behind our interval contract: TPU splash attention and cuDNN.

Both take static masks, so they serve only the band case: self-attention
(S == T, keys at positions 0..T-1) where query t sees the real keys of [t - W + 1, t]
(causal, optional window W). Rows with an empty interval are padding (splash only;
cuDNN takes none). What is statically outside that (cache positions, lookahead, operands
cuDNN refuses) the dispatcher sends to our flash kernel for the same platform; intervals
that are not the band at run time (packed segments, a window other than the hint) take
that kernel too, under lax.cond: the result is always that of the intervals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.blocks import round_up


def _valid_rows(k_start: jax.Array, k_end: jax.Array) -> jax.Array:
    """bool [B, T]: rows with a non-empty interval (real tokens)."""
    return k_start <= k_end


def is_band(k_start: jax.Array, k_end: jax.Array, window: int | None, padding: bool) -> jax.Array:
    """bool scalar: every real row t (a non-empty interval) sees exactly the real keys of [t - W + 1, t]
    (W None: [0, t]). Rows and keys with an empty interval are padding, allowed when `padding`
    (splash masks them by segment ids), else not (cuDNN takes none). O(T)."""
    t = k_start.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)
    valid = _valid_rows(k_start, k_end)
    lower = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)
    start = jnp.maximum(k_start, 0)
    counts = lambda x: jnp.pad(jnp.cumsum(x, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))  # [B, T + 1]: in [0, i)
    before = lambda c, i: jnp.take_along_axis(c, jnp.broadcast_to(i, k_start.shape), axis=1)
    real, fake = counts(valid), counts(~valid)
    band = (
        (k_end == pos)
        & (start >= lower)  # nothing left of the band
        & (before(fake, pos + 1) == before(fake, start))  # no padding key inside the interval
        & (before(real, start) == before(real, lower))  # no real key of the band left out
    )
    return jnp.all(band | ~valid) & (padding | jnp.all(valid))


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, group: int, window: int | None, softcap: float | None, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    left = None if window is None else window - 1
    mask = sm.MultiHeadMask([sm.LocalMask((t, t), (left, 0), offset=0) for _ in range(group)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
        return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, attn_logits_soft_cap=softcap,
                                                interpret=interpret)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array, k_end: jax.Array, *, scale: float,
           softcap: float | None, window: int | None, interpret: bool = False) -> jax.Array:
    """jax's splash attention (TPU), one MQA kernel per kv head; padding through segment ids.
    Intervals that are not the band (`is_band`) take kernels.flash_tpu instead.

    q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]; padding rows give zeros.
    """
    from kernels import flash_tpu

    def exact(q, k, v):
        return flash_tpu.attention(q, k, v, k_start, k_end, scale=scale, softcap=softcap, interpret=interpret)

    def fused(q, k, v):
        return _splash(q, k, v, k_start, k_end, scale=scale, softcap=softcap, window=window, interpret=interpret)

    return jax.lax.cond(is_band(k_start, k_end, window, padding=True), fused, exact, q, k, v)


def _splash(q, k, v, k_start, k_end, *, scale, softcap, window, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    block = 128
    tp = round_up(t, block)  # splash needs whole blocks: pad the tail (its rows are discarded)
    valid = _valid_rows(k_start, k_end)
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    qs = jnp.pad(q * jnp.asarray(scale, q.dtype), pad).reshape(b, tp, kv_heads, g, h)
    ks, vs = jnp.pad(k, pad), jnp.pad(v, pad)
    segment = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, tp - t)))
    kernel = _splash_kernel(tp, g, window, softcap, block, interpret)

    def one(qb, kb, vb, seg):  # qb [G, T, H], kb/vb [T, H]
        return kernel(qb, kb, vb, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_head)(jnp.einsum("BTKGH->BKGTH", qs), jnp.einsum("BTKH->BKTH", ks),
                             jnp.einsum("BTKH->BKTH", vs), segment)  # [B, K, G, T, H]
    out = jnp.einsum("BKGTH->BTKGH", out)[:, :t].reshape(b, t, n, h)
    return jnp.where(valid[..., None, None], out, 0).astype(q.dtype)


def cudnn_serves(q: jax.Array, k: jax.Array, v: jax.Array, softcap: float | None, interpret: bool) -> bool:
    """Whether jax's cuDNN attention takes these operands: more than one query, no soft-cap, q, k and v
    of one dtype, and on a GPU bf16/f16 (cuDNN refuses f32) with a head_dim that is a multiple of 8, up
    to 256 on Hopper or later and 128 before. Its stand-in on CPU (`interpret`: jax's XLA attention)
    takes any such dtype and head_dim."""
    from kernels import flash_hopper

    if q.shape[1] == 1 or softcap is not None or not q.dtype == k.dtype == v.dtype:
        return False  # (one query: a decode step, the decode kernel's)
    if interpret:
        return True
    h, h_max = q.shape[-1], 256 if flash_hopper.compute_capability() >= 9 else 128
    return q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= h_max


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array, k_end: jax.Array, *, scale: float,
          window: int | None, interpret: bool = False) -> jax.Array:
    """jax.nn.dot_product_attention with is_causal and local_window_size=(W - 1, 0)
    (its XLA implementation when `interpret`, i.e. on CPU).

    cuDNN has no cheap form of left padding (a bias or mask would be
    materialized at [B, N, T, S]), so a batch holding padding rows, or intervals
    that are not the band (`is_band`), takes our flash kernel instead (lax.cond:
    only one branch runs; both stay O(T) in memory).
    """
    from kernels import flash_gpu

    local = None if window is None else (window - 1, 0)

    def fused(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                           implementation=None if interpret else "cudnn")
        return out.astype(q.dtype)

    def exact(q, k, v):
        return flash_gpu.attention(q, k, v, k_start, k_end, scale=scale, interpret=interpret)

    return jax.lax.cond(is_band(k_start, k_end, window, padding=False), fused, exact, q, k, v)
