"""Decode-sized dense products on CPU: kernels.cpu_dense against XLA's einsum, in one run.

    .venv/bin/python benchmarks/cpu_dense.py [--rows 1,8,16,32,64]
    .venv/bin/python benchmarks/cpu_dense.py --step [--rows 8,16,32]

Each case chains L distinct weights of one 270M shape (a decode step reads every weight once,
and each product waits on the one before), so the weights stream from memory as in decode.
Prints GB/s of weights read for ours and XLA (f32 and bf16 weights, each row count) and the ratio.

--step: the real 270M's decode step (gemma.sampler.feed, jitted, over a 512-slot cache) at each row
count, in f32 and bf16, with the products on the kernel and with cpu_dense switched off (XLA's dots).
"""

from __future__ import annotations

import argparse
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


def step_ms(dtype, rows: int, kernel: bool) -> float:
    """Best wall time of one jitted decode step of the real 270M over `rows` rows (milliseconds)."""
    from flax import nnx

    from gemma.cache import init_cache
    from gemma.sampler import feed

    model = _model(dtype)
    graphdef, state = nnx.split(model)
    saved = cpu_dense.usable  # kernels.dense asks it when the step is traced: force each path, any rows
    cpu_dense.usable = lambda x, w, rows: kernel and w.dtype in (jnp.float32, jnp.bfloat16)

    @jax.jit
    def step(state, cache, token):
        return feed(nnx.merge(graphdef, state), cache, token, jnp.zeros(token.shape, bool))

    try:
        cache = init_cache(model.config, rows, 512, dtype)
        token = jnp.arange(rows, dtype=jnp.int32) + 100
        _, cache = step(state, cache, token)  # 1 token in each row's cache
        return best(step, state, cache, token) * 1e3
    finally:
        cpu_dense.usable = saved


_MODELS = {}


def _model(dtype):
    import checkpoints

    if dtype not in _MODELS:
        _MODELS.clear()
        _MODELS[dtype] = checkpoints.load("gemma3-270m", dtype=dtype)
    return _MODELS[dtype]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=None, help="row counts, comma-separated (default 1,8; --step 8,16,32)")
    ap.add_argument("--step", action="store_true", help="time the real 270M's decode step instead")
    ap.add_argument("--cases", default=None, help="--products only: indices into CASES, comma-separated")
    args = ap.parse_args()
    if not cpu_dense.available():
        sys.exit("kernels.cpu_dense is not available here (needs x86 AVX-512 and a C++ compiler)")
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()}, "
          f"cpu_dense.MAX_ROWS {cpu_dense.MAX_ROWS}\n")
    if args.step:
        print("| 270M decode step | rows | kernel ms | XLA ms | XLA / kernel |")
        print("|---|---|---|---|---|")
        for dtype in (jnp.bfloat16, jnp.float32):
            for rows in [int(r) for r in (args.rows or "8,16,32").split(",")]:
                ours, xla = step_ms(dtype, rows, True), step_ms(dtype, rows, False)
                print(f"| {jnp.dtype(dtype).name} | {rows} | {ours:.0f} | {xla:.0f} | {xla / ours:.2f}x |", flush=True)
        print(f"\nload average {os.getloadavg()}")
        return
    row_counts = [int(r) for r in (args.rows or "1,8").split(",")]
    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    print("| weights | dtype | rows | ours GB/s | XLA GB/s | ours / XLA |")
    print("|---|---|---|---|---|---|")
    for name, shape, layout, count in cases:
        for dtype in (jnp.float32, jnp.bfloat16):
            ws = [jax.random.normal(jax.random.key(i), shape, jnp.float32).astype(dtype) for i in range(count)]
            nbytes = sum(w.nbytes for w in ws)
            d = shape[1] if layout == "minor" else shape[0]
            for rows in row_counts:
                x = jax.random.normal(jax.random.key(99), (rows, d), jnp.float32)
                ours = best(jax.jit(lambda x, ws: chain(x, ws, layout, True)), x, ws)
                xla = best(jax.jit(lambda x, ws: chain(x, ws, layout, False)), x, ws)
                print(f"| {name} x{count} | {jnp.dtype(dtype).name} | {rows} | {nbytes / ours / 1e9:.1f} | "
                      f"{nbytes / xla / 1e9:.1f} | {xla / ours:.2f}x |", flush=True)
            del ws
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
