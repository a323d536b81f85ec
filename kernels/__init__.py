"""Attention kernels. One entry point, `attention`, over per-query key intervals.

`kernels` knows nothing of models: it takes q, k, v and the interval of keys
each query may see.
"""

from __future__ import annotations

import jax

from kernels import reference

IMPLS = ("xla",)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    k_pos: jax.Array | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Attention of q [B, T, N, H] over k, v [B, S, K, H]; query (b, t) sees keys s with
    k_start[b, t] <= k_pos[b, s] <= k_end[b, t] (k_pos defaults to s). `scale` defaults to H ** -0.5."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,T,N,H] and k, v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if k_start.shape != q.shape[:2] or k_end.shape != q.shape[:2]:
        raise ValueError(f"k_start/k_end must be [B, T] = {q.shape[:2]}; got {k_start.shape}, {k_end.shape}")
    if k_pos is not None and k_pos.shape != k.shape[:2]:
        raise ValueError(f"k_pos must be [B, S] = {k.shape[:2]}; got {k_pos.shape}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl in ("xla", "auto"):
        return reference.attention(q, k, v, k_start, k_end, scale=scale, softcap=softcap, k_pos=k_pos)
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS + ('auto',)}")
