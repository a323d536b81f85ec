"""bf16-weight matrix-vector products on x86 CPUs, through an XLA FFI custom call.

XLA:CPU (jaxlib 0.12) runs a bf16 dot at 1-4 GB/s, ten times slower than the
f32 one, so a bf16 model decoded slower than an f32 one. The two kernels in
cpu_dense.cc stream bf16 weights once, widen them to f32 exactly and accumulate
in f32. They are compiled on first use with the system C++ compiler into a
cache directory ($GEMMA_CACHE, default ~/.cache/gemma3-jax); without a
compiler, AVX-512 or on another backend, `available()` is False and callers
keep jnp.einsum.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_dense.cc")
# XLA's bf16 dot is slow only as a matrix-vector product: measured here ([262144, 640] head,
# [640, 2048] MLP), the kernels win at 1 row (22 vs 339 ms; 0.28 vs 0.83 ms) and 2 rows, and XLA's
# GEMM path wins from 4 rows (39 vs 32 ms head at 4 rows, 67 vs 39 ms at 8).
MAX_ROWS = 2


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def available() -> bool:
    """True once the kernels are built and registered with XLA for the CPU platform."""
    if os.environ.get("GEMMA_NO_CPU_KERNELS") or not {"avx512f", "avx512bw"} <= _cpu_flags():
        return False
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        return False
    with open(SOURCE, "rb") as f:
        tag = hashlib.sha256(f.read() + jax.__version__.encode()).hexdigest()[:16]
    cache = os.environ.get("GEMMA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gemma3-jax"))
    lib = os.path.join(cache, f"cpu_dense-{tag}.so")
    try:
        if not os.path.exists(lib):
            os.makedirs(cache, exist_ok=True)
            tmp = f"{lib}.{os.getpid()}.tmp"
            subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
                            "-w", f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp],
                           check=True, capture_output=True, timeout=300)
            os.replace(tmp, lib)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin against XLA's
        handle = ctypes.cdll.LoadLibrary(lib)
        for name in ("gemma_dense_minor", "gemma_dense_major"):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)), platform="cpu")
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"bf16 CPU kernels unavailable ({e}); bf16 decode uses XLA's slower dot")
        return False
    return True


def usable(x: jax.Array, w: jax.Array, rows: int) -> bool:
    """Whether dense() serves this product: bf16 weights, <= MAX_ROWS rows, CPU backend, kernels built."""
    return (w.dtype == jnp.bfloat16 and rows <= MAX_ROWS and jax.default_backend() == "cpu" and available())


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def dense(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """f32 [M, V] = x [M, D] . w, with w bf16 [V, D] (layout "minor": contract w's last axis) or
    [D, V] ("major": its first). Differentiable (tangents through jnp.einsum)."""
    m = x.shape[0]
    v = w.shape[0] if layout == "minor" else w.shape[1]
    target = "gemma_dense_minor" if layout == "minor" else "gemma_dense_major"
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, v), jnp.float32))(x.astype(jnp.float32), w)


@dense.defjvp
def _dense_jvp(layout, primals, tangents):
    x, w = primals
    dx, dw = tangents
    spec = "MD,VD->MV" if layout == "minor" else "MD,DV->MV"
    tangent = (jnp.einsum(spec, dx.astype(jnp.float32), w.astype(jnp.float32))
               + jnp.einsum(spec, x.astype(jnp.float32), dw.astype(jnp.float32)))
    return dense(x, w, layout), tangent
