"""The KV cache's decode step on x86 CPUs: the cache write and one-token attention, as XLA FFI custom calls.

XLA:CPU (jaxlib 0.12) widens a bf16 scatter to f32, so writing one token into a bf16 cache converts the
whole cache to f32 and back; and its decode attention (two einsums over [B, S, K, H]) transposes the
values to [B, H, S], a copy of the cache per layer. At 16 rows over a 512-slot cache these were most
of the real 270M's bf16 decode step (benchmarks/RESULTS.md, Serving). `write` copies the new rows in
place (the output aliases the cache: donate it); `attention` reads keys and values once, in f32.
Built on first use (kernels.cpu_build); without a compiler, AVX-512 or on another backend `usable()`
is False and callers keep the XLA path.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels import cpu_build

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_decode.cc")
SYMBOLS = ["gemma_cache_write", "gemma_decode_attention_f32", "gemma_decode_attention_bf16", "gemma_argmax_rows",
           "gemma_put_rows", "gemma_copy_rows", "gemma_take_rows"]


@functools.cache
def available() -> bool:
    """True once the kernels are built and registered with XLA for the CPU platform."""
    return cpu_build.load(SOURCE, ("-march=native",), SYMBOLS, {"avx512f", "avx512bw"}, "CPU decode kernels",
                          "the cache's decode step uses XLA")


def usable() -> bool:
    """Whether the cache's decode step takes these kernels (checked at trace time; GEMMA_NO_CPU_DECODE=1: no)."""
    return jax.default_backend() == "cpu" and not os.environ.get("GEMMA_NO_CPU_DECODE") and available()


def write(dst: jax.Array, src: jax.Array, slots: jax.Array) -> jax.Array:
    """dst [B, S, ...] with dst[b, slots[b, t]] = src[b, t] (slots outside [0, S) dropped): the
    scatter `dst.at[rows, slots].set(src, mode="drop")`, in place when dst is donated."""
    if not available():
        raise RuntimeError("the CPU decode kernels are not available on this machine")
    call = jax.ffi.ffi_call("gemma_cache_write", jax.ShapeDtypeStruct(dst.shape, dst.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(dst, src.astype(dst.dtype), slots.astype(jnp.int32))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_start: jax.Array, k_end: jax.Array, k_pos: jax.Array, *,
              scale: float, softcap: float | None = None) -> jax.Array:
    """kernels.reference.attention for one query per row (T = 1): q [B, 1, N, H], k, v [B, S, K, H]
    (f32 or bf16; other dtypes are widened to f32), k_start, k_end [B, 1], k_pos [B, S].
    Returns [B, 1, N, H] in q's dtype; scores, softmax and the sum over values in f32."""
    if not available():
        raise RuntimeError("the CPU decode kernels are not available on this machine")
    b, t, n, h = q.shape
    if t != 1:
        raise ValueError(f"cpu_decode.attention takes one query per row, got T = {t}")
    if k.dtype not in (jnp.float32, jnp.bfloat16) or v.dtype != k.dtype:
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    kind = "bf16" if k.dtype == jnp.bfloat16 else "f32"
    call = jax.ffi.ffi_call(f"gemma_decode_attention_{kind}", jax.ShapeDtypeStruct((b, n, h), jnp.float32),
                            vmap_method="sequential")
    out = call(q.reshape(b, n, h).astype(jnp.float32), k, v, k_pos.astype(jnp.int32),
               k_start[:, 0].astype(jnp.int32), k_end[:, 0].astype(jnp.int32), scale=np.float32(scale),
               softcap=np.float32(softcap or 0.0))
    return out.reshape(b, 1, n, h).astype(q.dtype)


def argmax(x: jax.Array, limit: int | None = None) -> jax.Array:
    """int32 [B]: jnp.argmax(x[:, :limit], axis=-1) for f32 x [B, V] (the first of equal maxima; the first NaN
    if a row holds one), one pass over each row."""
    if not available():
        raise RuntimeError("the CPU decode kernels are not available on this machine")
    b, v = x.shape
    call = jax.ffi.ffi_call("gemma_argmax_rows", jax.ShapeDtypeStruct((b,), jnp.int32), vmap_method="sequential")
    return call(x.astype(jnp.float32), limit=np.int64(v if limit is None else min(limit, v)))


def put_rows(big: jax.Array, part: jax.Array, start) -> jax.Array:
    """big with rows [start, start + len(part)) along axis 0 replaced by part (jax.lax.dynamic_update_slice_in_dim;
    start is clamped the same way). On CPU through `write`, in place when big is donated: XLA:CPU widens a bf16
    dynamic-update-slice to f32 as it does a scatter, converting all of `big` there and back."""
    if not usable():
        return jax.lax.dynamic_update_slice_in_dim(big, part.astype(big.dtype), start, axis=0)
    call = jax.ffi.ffi_call("gemma_put_rows", jax.ShapeDtypeStruct(big.shape, big.dtype), input_output_aliases={0: 0},
                            vmap_method="sequential")
    return call(big, part.astype(big.dtype), jnp.asarray(start, jnp.int32).reshape(1))


def copy_rows(big: jax.Array, part: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """big with row dst[k] replaced by part[src[k]] for each k (int32 [K]; a dst outside [0, len(big)) or a src
    outside [0, len(part)) copies nothing). On CPU in place when big is donated (XLA:CPU widens a bf16 scatter)."""
    src, dst = jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32)
    if not usable():
        ok = (src >= 0) & (src < part.shape[0]) & (dst >= 0) & (dst < big.shape[0])
        rows = jnp.where(ok, dst, big.shape[0])  # out of range: dropped
        return big.at[rows].set(part[jnp.clip(src, 0, part.shape[0] - 1)].astype(big.dtype), mode="drop")
    call = jax.ffi.ffi_call("gemma_copy_rows", jax.ShapeDtypeStruct(big.shape, big.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(big, part.astype(big.dtype), src, dst)


def take_rows(big: jax.Array, n: int) -> jax.Array:
    """big[:n] (n static). On CPU a plain copy through the kernels: XLA:CPU slices bf16 through f32."""
    if not usable() or n >= big.shape[0]:
        return big[:n]
    call = jax.ffi.ffi_call("gemma_take_rows", jax.ShapeDtypeStruct((n, *big.shape[1:]), big.dtype),
                            vmap_method="sequential")
    return call(big)
