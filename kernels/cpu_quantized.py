"""Decode-sized int8 / int4 products on x86 CPUs (cpu_quantized.cc), through an XLA FFI custom call.

The weights are read once per call and widened in registers to the exact float32 values of
`quantized.dequantize`; every row of x (<= MAX_ROWS per pass) is held against them in f32.
The instruction set is chosen at run time from the CPU's flags: the AVX-512 build where the CPU
has AVX-512 (F, BW, VL), else the AVX2 + FMA build; GEMMA_CPU_ISA=avx2 forces the narrower one.
Without a compiler, AVX2 or on another backend `usable()` is False and quantized.matmul
dequantizes inside an XLA dot instead.
"""

from __future__ import annotations

import functools
import os
import subprocess
import warnings

import jax
import jax.numpy as jnp

from kernels import cpu_build

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_quantized.cc")
MAX_ROWS = 8
# name -> (CPU flags it needs, compiler flags), widest first
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "fma", "f16c"},
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c", "-DGEMMA_AVX512")),
    "avx2": ({"avx2", "fma", "f16c"}, ("-mavx2", "-mfma", "-mf16c")),
}


def supported() -> list[str]:
    """The instruction sets of ISAS this CPU runs, widest first."""
    return [name for name, (needs, _) in ISAS.items() if needs <= cpu_build.cpu_flags()]


def default_isa() -> str | None:
    """The build decode uses: GEMMA_CPU_ISA if set (and supported), else the widest supported."""
    forced = os.environ.get("GEMMA_CPU_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"GEMMA_CPU_ISA={forced!r}: expected one of {sorted(ISAS)}")
        return forced if forced in supported() else None
    names = supported()
    return names[0] if names else None


@functools.cache
def available(isa: str | None = None) -> bool:
    """True once the `isa` build (default: default_isa()) is compiled and registered with XLA."""
    isa = isa or default_isa()
    if os.environ.get("GEMMA_NO_CPU_KERNELS") or isa is None or isa not in supported():
        return False
    symbols = [f"gemma_q{b}_{s}_{isa}" for b in (8, 4) for s in ("f16", "f32")]
    try:
        cpu_build.build(SOURCE, ISAS[isa][1], symbols)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"CPU quantized kernels ({isa}) unavailable ({e} {detail[-400:].decode(errors='replace')}); "
                      "quantized decode dequantizes inside XLA's dots")
        return False
    return True


def usable(rows: int) -> bool:
    """Whether matmul() serves a product of `rows` activation rows here."""
    return rows <= MAX_ROWS and jax.default_backend() == "cpu" and available()


def matmul(x: jax.Array, w, isa: str | None = None) -> jax.Array:
    """float32 [M, R] = x [M, K] . dequantize(w) [R, K]^T for a 2-D kernels.quantized.QArray, any M
    (8 rows per pass over the weights). `isa` picks a build (default: default_isa())."""
    isa = isa or default_isa()
    if not available(isa):
        raise RuntimeError(f"the {isa} CPU quantized kernels are not available on this machine")
    scale = {jnp.float16: "f16", jnp.float32: "f32"}.get(jnp.dtype(w.scale.dtype).type)
    if scale is None:
        raise ValueError(f"quantized scales must be float16 or float32, got {w.scale.dtype}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.data.shape[0]), jnp.float32)
    args = (w.data, w.scale) if w.bits == 8 else (w.data, w.scale, w.minimum)
    return jax.ffi.ffi_call(f"gemma_q{w.bits}_{scale}_{isa}", out)(x.astype(jnp.float32), *args)
