"""Decode-sized dense products on CPU: kernels.cpu_dense against XLA's einsum, in one run.

    .venv/bin/python benchmarks/cpu_dense.py

Each case chains L distinct weights of one 270M shape (a decode step reads every weight once,
and each product waits on the one before), so the weights stream from memory as in decode.
Prints GB/s of weights read for ours and XLA (f32 and bf16 weights, 1 and 8 rows) and the ratio.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import cpu_dense  # noqa: E402

CASES = [  # (name, weight shape, layout, count): about 200 MB of f32 weights each
    ("MLP gate/up [640, 2048]", (640, 2048), "major", 40),
    ("MLP down [2048, 640]", (2048, 640), "major", 40),
    ("q proj [640, 1024]", (640, 1024), "major", 80),
    ("head [262144, 640]", (262144, 640), "minor", 1),
]


def best(f, *args, n=5):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def chain(x, ws, layout, ours):
    spec = "MD,VD->MV" if layout == "minor" else "MD,DV->MV"
    for w in ws:
        y = cpu_dense.dense(x, w, layout) if ours else jnp.einsum(spec, x.astype(w.dtype), w,
                                                                   preferred_element_type=jnp.float32)
        x = x + 1e-30 * y.sum()  # the next product waits on this one
    return x


def main():
    if not cpu_dense.available():
        sys.exit("kernels.cpu_dense is not available here (needs x86 AVX-512 and a C++ compiler)")
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()}\n")
    print("| weights | dtype | rows | ours GB/s | XLA GB/s | ours / XLA |")
    print("|---|---|---|---|---|---|")
    for name, shape, layout, count in CASES:
        for dtype in (jnp.float32, jnp.bfloat16):
            ws = [jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype) for i in range(count)]
            nbytes = sum(w.nbytes for w in ws)
            d = shape[1] if layout == "minor" else shape[0]
            for rows in (1, 8):
                x = jax.random.normal(jax.random.key(99), (rows, d), jnp.float32)
                ours = best(jax.jit(lambda x, ws: chain(x, ws, layout, True)), x, ws)
                xla = best(jax.jit(lambda x, ws: chain(x, ws, layout, False)), x, ws)
                print(f"| {name} x{count} | {jnp.dtype(dtype).name} | {rows} | {nbytes / ours / 1e9:.1f} | "
                      f"{nbytes / xla / 1e9:.1f} | {xla / ours:.2f}x |", flush=True)
            del ws


if __name__ == "__main__":
    main()
