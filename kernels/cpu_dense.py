"""Decode-sized dense products (1-32 rows) on x86 CPUs, through an XLA FFI custom call.

Decode reads every weight once per token, so it runs at memory speed or not at
all. XLA:CPU (jaxlib 0.12) runs a bf16 matrix-vector dot at 1-5 GB/s, and its
f32 GEMM path reads a few-row product at 7-10 GB/s; the kernels in
cpu_dense.cc stream f32 or bf16 weights once (bf16 widened to f32 exactly),
prefetch ahead of the stream, hold every row of x against each weight vector and
accumulate in f32, on XLA's own intra-op thread pool. With bf16 activations and
bf16 weights on a CPU with AVX512_BF16 (`bf16_dot()`), neither is widened:
vdpbf16ps multiplies pairs of bf16 and sums them in f32, twice the multiply-adds
per instruction, with rows of x packed so that each tile keeps its accumulators
in registers (at 16-32 rows decode is bound by these instructions, not memory).
They are compiled on first use (kernels.cpu_build); without a compiler, AVX-512
or on another backend, `available()` is False and callers keep jnp.einsum.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels import cpu_build

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_dense.cc")
# benchmarks/cpu_dense.py (chained products, weights streamed from memory as in decode), 1 / 8 rows:
# [640, 2048] f32 22.4 / 14.1 GB/s against XLA's 16.5 / 3.8, bf16 17.7 / 7.1 against 1.4 / 5.0; the
# [262144, 640] head f32 20.3 / 19.3 against 19.9 / 10.6. Above 8 rows the kernels take groups of 8;
# `--step` (the real 270M's decode step, RESULTS.md): the kernels win through 32 rows (the most
# measured) for bf16 weights and through 16 for f32; at 32 f32 rows XLA's GEMM path ties them.
_MAX_ROWS = {jnp.dtype(jnp.float32): 16, jnp.dtype(jnp.bfloat16): 32}  # per weight dtype
MAX_ROWS = max(_MAX_ROWS.values())  # the most rows any weight dtype sends here


@functools.cache
def available() -> bool:
    """True once the kernels are built and registered with XLA for the CPU platform."""
    symbols = [f"gemma_dense_{layout}_{w}" for layout in ("minor", "major")
               for w in ("f32", "bf16") + (("bf16x",) if _has_bf16_dot() else ())]
    return cpu_build.load(SOURCE, ("-march=native",), symbols, {"avx512f", "avx512bw"}, "CPU dense kernels",
                          "decode uses XLA's slower dots")


def _has_bf16_dot() -> bool:
    return "avx512_bf16" in cpu_build.cpu_flags()


def bf16_dot() -> bool:
    """Whether bf16 activations against bf16 weights run on vdpbf16ps (AVX512_BF16; GEMMA_NO_BF16_DOT=1 at
    trace time turns it off): neither is widened, twice the multiply-adds per instruction of the f32 path."""
    return _has_bf16_dot() and not os.environ.get("GEMMA_NO_BF16_DOT")


def usable(x: jax.Array, w: jax.Array, rows: int) -> bool:
    """Whether dense() serves this product: f32 (<= 16 rows) or bf16 (<= 32 rows) weights, CPU backend, kernels
    built."""
    return (rows <= _MAX_ROWS.get(jnp.dtype(w.dtype), 0) and jax.default_backend() == "cpu"
            and available())


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """f32 [M, V] = x [M, D] . w, with w f32 or bf16 [V, D] (layout "minor": contract w's last axis)
    or [D, V] ("major": its first). Any M (the kernels take 8 rows per pass). Differentiable
    (tangents through jnp.einsum)."""
    if not available():
        raise RuntimeError("kernels.cpu_dense is not available on this machine (x86 AVX-512 and a C++ compiler)")
    m = x.shape[0]
    v = w.shape[0] if layout == "minor" else w.shape[1]
    out = jax.ShapeDtypeStruct((m, v), jnp.float32)
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.bfloat16 and bf16_dot():
        return jax.ffi.ffi_call(f"gemma_dense_{layout}_bf16x", out, vmap_method="sequential")(x, w)  # bf16 pairs, f32 sums
    target = f"gemma_dense_{layout}_{'bf16' if w.dtype == jnp.bfloat16 else 'f32'}"
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x.astype(jnp.float32), w)


@dense.defjvp
def _dense_jvp(layout, primals, tangents):
    x, w = primals
    dx, dw = tangents
    spec = "MD,VD->MV" if layout == "minor" else "MD,DV->MV"
    tangent = (jnp.einsum(spec, dx.astype(jnp.float32), w.astype(jnp.float32))
               + jnp.einsum(spec, x.astype(jnp.float32), dw.astype(jnp.float32)))
    return dense(x, w, layout), tangent
