"""Banded XLA attention for long self-attention with a sliding window, O(T * (C + W)) not O(T^2).

Query t sees only keys in [t - window + 1, t + lookahead] (the caller promises
it; k_start / k_end still give each query's exact interval inside that band,
e.g. padding or a bidirectional image block). Queries are cut into chunks of C;
chunk c reaches keys [c*C - P, c*C + C + A) with P = window - 1 and A =
lookahead, each rounded up to whole chunks. Those keys are gathered as
`P/C + 1 + A/C` shifted static slices of the chunked keys, and each chunk runs
the reference attention (kernels.reference) over its band with the keys' true
positions; keys outside 0..T-1 (padding of the band) get position EMPTY.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import reference
from kernels.blocks import EMPTY, round_up


def default_chunk(window: int, t: int) -> int:
    """C: the window rounded up to a multiple of 128, but no longer than T (rounded up to 8)."""
    return min(round_up(max(window, 1), 128), round_up(t, 8))


def _bands(x: jax.Array, chunk: int, before: int, after: int) -> jax.Array:
    """Key bands of each chunk: x [B, T', ...] (T' = nC * C) -> [B, nC, (before + 1 + after) * C, ...].

    Band c holds chunks c - before .. c + after of x (zeros outside x).
    """
    b, t = x.shape[:2]
    n = t // chunk
    xc = x.reshape(b, n, chunk, *x.shape[2:])
    xc = jnp.pad(xc, [(0, 0), (before, after)] + [(0, 0)] * (xc.ndim - 2))
    shifts = [xc[:, j:j + n] for j in range(before + 1 + after)]  # each [B, nC, C, ...]
    return jnp.concatenate(shifts, axis=2)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int,
    chunk: int | None = None,
    lookahead: int = 0,
) -> jax.Array:
    """Self-attention, q [B, T, N, H] over k, v [B, T, K, H] (key s at position s), inside a band.

    Equals reference.attention(q, k, v, k_start, k_end, ...) whenever every
    query t's interval lies in [t - window + 1, t + lookahead].
    """
    b, t, n, h = q.shape
    if k.shape[:2] != (b, t) or v.shape != k.shape:
        raise ValueError(f"banded attention is self-attention (S == T); got q {q.shape}, k {k.shape}, v {v.shape}")
    if window < 1 or lookahead < 0:
        raise ValueError(f"banded attention needs window >= 1 and lookahead >= 0; got {window}, {lookahead}")
    chunk = chunk or default_chunk(window, t)
    before = -(-(window - 1) // chunk)  # whole chunks covering the window - 1 keys back
    after = -(-lookahead // chunk)
    tp = round_up(t, chunk)
    n_chunks = tp // chunk

    def pad(x, value=0):
        return jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    # Keys exist only at 0..T-1: clamping keeps each interval's visible set and keeps EMPTY invisible.
    k_start = jnp.maximum(k_start, 0)
    k_end = jnp.minimum(k_end, t - 1)
    qc = pad(q).reshape(b * n_chunks, chunk, n, h)
    starts = pad(k_start, 1).reshape(b * n_chunks, chunk)  # padded queries: empty interval [1, 0]
    ends = pad(k_end, 0).reshape(b * n_chunks, chunk)
    band = (before + 1 + after) * chunk
    kb = _bands(pad(k), chunk, before, after).reshape(b * n_chunks, band, *k.shape[2:])
    vb = _bands(pad(v), chunk, before, after).reshape(b * n_chunks, band, *v.shape[2:])
    first = (jnp.arange(n_chunks, dtype=jnp.int32) - before) * chunk  # position of each band's first key
    pos = first[:, None] + jnp.arange(band, dtype=jnp.int32)[None, :]  # [nC, band]
    pos = jnp.where((pos >= 0) & (pos < t), pos, EMPTY)
    pos = jnp.broadcast_to(pos[None], (b, n_chunks, band)).reshape(b * n_chunks, band)
    out = reference.attention(qc, kb, vb, starts, ends, scale=scale, softcap=softcap, k_pos=pos)
    return out.reshape(b, tp, n, h)[:, :t]


def blocked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    lookahead: int = 0,
    chunk: int = 128,
) -> jax.Array:
    """Self-attention in query chunks, each over the static key range its band can reach: chunk [c0, c1)
    sees keys [c0 - window + 1, c1 + lookahead) at most. A causal row of T keys then scores ~T^2 / 2 pairs,
    not T^2, for sequences too short for the banded path. Equals reference.attention whenever every query
    t's interval lies in [t - window + 1, t + lookahead] (window None: unbounded back)."""
    b, t = q.shape[:2]
    if k.shape[:2] != (b, t) or v.shape != k.shape:
        raise ValueError(f"blocked attention is self-attention (S == T); got q {q.shape}, k {k.shape}, v {v.shape}")
    outs = []
    for c0 in range(0, t, chunk):
        c1 = min(c0 + chunk, t)
        lo = 0 if window is None else max(0, c0 - window + 1)
        hi = min(t, c1 + lookahead)
        pos = jnp.broadcast_to(jnp.arange(lo, hi, dtype=jnp.int32), (b, hi - lo))
        outs.append(reference.attention(q[:, c0:c1], k[:, lo:hi], v[:, lo:hi], k_start[:, c0:c1], k_end[:, c0:c1],
                                        scale=scale, softcap=softcap, k_pos=pos))
    return jnp.concatenate(outs, axis=1)
