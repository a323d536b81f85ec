"""XLA reference attention over per-query key intervals.

This is the oracle every kernel must match. Every mask Gemma 3 needs (causal,
sliding window, per-image bidirectional blocks, padding, packed segments) is
an inclusive key interval [k_start, k_end] per query row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interval_mask(k_start: jax.Array, k_end: jax.Array, k_pos: jax.Array) -> jax.Array:
    """bool [B, T, S]: key s is visible to query t iff k_start[b, t] <= k_pos[b, s] <= k_end[b, t]."""
    k_pos = k_pos[:, None, :]
    return (k_pos >= k_start[..., None]) & (k_pos <= k_end[..., None])


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
) -> jax.Array:
    """Grouped-query attention restricted to per-query key intervals.

    Args:
      q: [B, T, N, H] queries (N = K * G heads).
      k, v: [B, S, K, H] keys and values.
      k_start, k_end: int32 [B, T]; query (b, t) attends to keys s with
        k_start <= k_pos[b, s] <= k_end. An empty interval (k_start > k_end) yields zeros. Keys and
        values must be finite even where no query sees them: the masked matmul's 0 * NaN is NaN (the
        kernels skip such slots; zeroing them here cost 20-25% of the 270M's batch-8 CPU decode
        over an 8K cache, whose slots the model zero-fills anyway).
      scale: multiplier of q·k (Gemma 3: query_pre_attn_scalar ** -0.5).
      softcap: optional tanh soft-capping of the scores.
      k_pos: int32 [B, S], the position of each key (default: its index s). A
        ring-buffer cache passes the positions its slots hold.

    Returns:
      [B, T, N, H] in q's dtype. Scores and softmax are computed in float32.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    qg = q.reshape(b, t, kv_heads, g, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if k_pos is None:
        k_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
    visible = interval_mask(k_start, k_end, k_pos)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def softmax_delta(o: jax.Array, do: jax.Array) -> jax.Array:
    """f32 [B, N, T]: rowsum(dO * O) of o, do [B, T, N, H], the term every flash backward subtracts from
    dP = dO V^T to form dS = P * (dP - delta) (the softmax's Jacobian applied row by row)."""
    return jnp.einsum("btnh->bnt", o.astype(jnp.float32) * do.astype(jnp.float32))  # exact: no matmul pass
