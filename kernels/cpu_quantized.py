"""Decode-sized int8 / int4 products on x86 CPUs (cpu_quantized.cc), through an XLA FFI custom call.

Two arithmetics, one build each per instruction set, chosen at run time from the CPU's flags:
- "avx512" / "avx2": the weights are read once per call and widened in registers to the exact float32
  values of `quantized.dequantize`; every row of x (<= MAX_ROWS per pass) is held against them in f32.
- "avx512vnni" (AVX-512 VNNI): llama.cpp's way, x quantized per block of 32 values to int8 (`quantize_x`),
  integer products on vpdpbusd, each group's sum scaled in f32. Contractions that are not whole chunks of
  64 (or groups other than 16, 32 or multiples of 64) take the "avx512" build.
Either way each row's result is the same bits whatever rows share its pass, and the same run to run.
GEMMA_CPU_ISA names a build (e.g. avx2 to force the narrower one). Without a compiler, AVX2 or on another
backend `usable()` is False and quantized.matmul dequantizes inside an XLA dot instead.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from kernels import cpu_build

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_quantized.cc")
MAX_ROWS = 8
# name -> (CPU flags it needs, compiler flags): the widening builds widest first, then the VNNI one
ISAS = {
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "fma", "f16c"},
               ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c", "-DGEMMA_AVX512")),
    "avx2": ({"avx2", "fma", "f16c"}, ("-mavx2", "-mfma", "-mf16c")),
    "avx512vnni": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"},
                   ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c",
                    "-DGEMMA_AVX512", "-DGEMMA_VNNI")),
}
# Builds that quantize x per block of 32 to int8 (quantize_x) before the product: only where GEMMA_CPU_ISA names
# them. Measured on the 2-core AVX-512 VNNI box (benchmarks/RESULTS.md, 2026-12-07): no faster than widening at
# 1-5 rows (the head's product is memory-bound either way), and the target's greedy ids then differ between a
# speculative verify pass and plain decode (tiny activation differences cross int8 rounding steps).
QUANTIZES_X = ("avx512vnni",)


def vnni_serves(k: int, group: int) -> bool:
    """Whether the VNNI build takes a contraction of k values in groups of `group` (else matmul widens)."""
    return k % 64 == 0 and (group in (16, 32) or group % 64 == 0)


def quantize_x(x) -> tuple:
    """NumPy reference of the VNNI build's activations: x [M, K] in blocks of 32, d = max|x| / 127 (float32),
    q = round(x * (1 / d)) to nearest even (0 where d == 0). Returns (q int8 [M, K], d float32 [M, K // 32])."""
    import numpy as np

    x = np.asarray(x, np.float32)
    blocks = x.reshape(x.shape[0], -1, 32)
    d = (np.abs(blocks).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[..., None]).astype(np.int8)
    return q.reshape(x.shape), d


def supported() -> list[str]:
    """The instruction sets of ISAS this CPU runs, widest first."""
    return [name for name, (needs, _) in ISAS.items() if needs <= cpu_build.cpu_flags()]


def default_isa() -> str | None:
    """The build decode uses: GEMMA_CPU_ISA if set (and supported), else the widest supported widening build."""
    forced = os.environ.get("GEMMA_CPU_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"GEMMA_CPU_ISA={forced!r}: expected one of {sorted(ISAS)}")
        return forced if forced in supported() else None
    names = [name for name in supported() if name not in QUANTIZES_X]
    return names[0] if names else None


@functools.cache
def available(isa: str | None = None) -> bool:
    """True once the `isa` build (default: default_isa()) is compiled and registered with XLA."""
    isa = isa or default_isa()
    if isa is None or isa not in supported():
        return False
    symbols = [f"gemma_q{b}_{s}_{isa}" for b in (8, 4) for s in ("f16", "f32")]
    return cpu_build.load(SOURCE, ISAS[isa][1], symbols, ISAS[isa][0], f"CPU quantized kernels ({isa})",
                          "quantized decode dequantizes inside XLA's dots")


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
    if isa in QUANTIZES_X and not vnni_serves(w.shape[1], w.group):
        isa = "avx512"  # the same CPU's build that widens the weights instead
        if not available(isa):
            raise RuntimeError(f"the avx512 CPU quantized kernels, which serve {w.shape} weights in groups of "
                               f"{w.group} for the VNNI build, are not available on this machine")
    out = jax.ShapeDtypeStruct((x.shape[0], w.data.shape[0]), jnp.float32)
    args = (w.data, w.scale) if w.bits == 8 else (w.data, w.scale, w.minimum)
    return jax.ffi.ffi_call(f"gemma_q{w.bits}_{scale}_{isa}", out, vmap_method="sequential")(x.astype(jnp.float32), *args)
