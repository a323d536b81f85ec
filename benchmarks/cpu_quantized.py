"""The int4 270M's quantized products and decode passes on CPU, time per op, in one process.

    .venv/bin/python benchmarks/cpu_quantized.py [--rows 1,2,3,5] [--isas avx512vnni,avx512] [--repeats 2]

Loads the real 270M GGUF with quantize="int4" (Q4_K as int4, Q5_0 / Q6_K / Q8_0 as int8, the Q8_0 head).
Products: each projection kind chained over the 18 layers as a decode step reads them (each product waits
on the one before, so the weights stream from memory), and the head; ms and GB/s of weights read at each
row count (rows = draft + 1 in a speculative verify pass). Passes: one jitted model.extend of `rows`
tokens over a 256-token cache (the plain step at 1 row, a verify pass above), its total against the sum
of its products: the rest is attention, norms, RoPE, the cache write and the embedding lookup.
Builds (--isas) and row counts alternate within each repeat (interleaved A/B); the load average is printed.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kernels import cpu_quantized  # noqa: E402
from kernels.quantized import QuantizedEinsum  # noqa: E402


def best(f, *args, n=5):
    """(least wall seconds, least CPU seconds of all threads) of n calls: on a shared machine the CPU time is
    the steadier figure (a quiet 2-core run's wall time is about half of it for work both threads share)."""
    jax.block_until_ready(f(*args))
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(*args))
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def chain(x, ws, isa):
    for w in ws:
        y = cpu_quantized.matmul(x, w, isa)
        x = x + 1e-30 * y.sum()  # the next product waits on this one
    return x


def kinds(model) -> dict[str, list]:
    """Projection kind (path tail, format) -> the 2-D QArrays of that kind in layer order; "head" last."""
    out = collections.defaultdict(list)
    for path, m in nnx.iter_graph(model):
        if isinstance(m, QuantizedEinsum):
            w = m.weight().flat()
            fmt = f"int{w.bits} g{w.group} {jnp.dtype(w.scale.dtype).name}"
            name = "head" if "embedder" in path else str(path[-1])
            out[f"{name} {tuple(w.shape)} {fmt}"].append(w)
    return dict(sorted(out.items(), key=lambda kv: kv[0].startswith("head")))


def pass_s(model, rows: int, isa: str, cache_len: int = 256) -> float:
    """Best wall time of one jitted model.extend of `rows` tokens after `cache_len` prompt tokens, its
    quantized products on the `isa` build (GEMMA_CPU_ISA while it is traced)."""
    from gemma.cache import init_cache

    os.environ["GEMMA_CPU_ISA"] = isa
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, state).extend(tokens, positions, cache, last_only=rows == 1)
        return logits, cache.length

    cache = init_cache(model.config, 1, cache_len + 16, jnp.float32)
    _, cache = jax.jit(lambda s, c, t, p: nnx.merge(graphdef, s).extend(t, p, c))(
        state, cache, jnp.arange(cache_len, dtype=jnp.int32)[None] + 100, jnp.arange(cache_len, dtype=jnp.int32)[None])
    tokens = jnp.arange(rows, dtype=jnp.int32)[None] + 7
    positions = cache_len + jnp.arange(rows, dtype=jnp.int32)[None]
    try:
        return best(run, state, cache, tokens, positions)
    finally:
        del os.environ["GEMMA_CPU_ISA"]


def main():
    import checkpoints

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,3,5", help="row counts, comma-separated")
    ap.add_argument("--isas", default=None, help="cpu_quantized.ISAS builds, comma-separated (default: all this CPU runs)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-passes", action="store_true", help="products only")
    args = ap.parse_args()
    isas = args.isas.split(",") if args.isas else cpu_quantized.supported()
    for isa in isas:
        if not cpu_quantized.available(isa):
            sys.exit(f"the {isa} CPU quantized kernels are not available here")
    row_counts = [int(r) for r in args.rows.split(",")]
    model = checkpoints.load("gemma3-270m", quantize="int4")
    groups = kinds(model)
    print(f"jax {jax.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()}\n")
    fns = {(name, isa): jax.jit(lambda x, ws, isa=isa: chain(x, ws, isa)) for name in groups for isa in isas}
    results = collections.defaultdict(list)
    for _ in range(args.repeats):
        for rows in row_counts:
            for isa in isas:
                for name, ws in groups.items():
                    x = jax.random.normal(jax.random.key(rows), (rows, ws[0].shape[1]), jnp.float32)
                    results[name, rows, isa].append(best(fns[name, isa], x, ws, n=3))
                if not args.no_passes:
                    results["pass", rows, isa].append(pass_s(model, rows, isa))
    for isa in isas:
        print(f"\n{isa}: least wall ms / least CPU ms (both threads) of each\n")
        print("| product | count | MB | " + " | ".join(f"{r} rows" for r in row_counts) + " |")
        print("|---|---|---|" + "---|" * len(row_counts))
        total = collections.defaultdict(lambda: [0.0, 0.0])
        for name, ws in groups.items():
            nbytes = sum(w.nbytes for w in ws)
            cells = []
            for rows in row_counts:
                wall, cpu = (min(t[i] for t in results[name, rows, isa]) for i in (0, 1))
                total[rows][0] += wall
                total[rows][1] += cpu
                cells.append(f"{1e3 * wall:.2f} / {1e3 * cpu:.2f}")
            print(f"| {name} | {len(ws)} | {nbytes / 1e6:.1f} | " + " | ".join(cells) + " |")
        print("| all products | | | " + " | ".join(f"{1e3 * total[r][0]:.2f} / {1e3 * total[r][1]:.2f}"
                                                  for r in row_counts) + " |")
        if not args.no_passes:
            passes = {r: [min(t[i] for t in results["pass", r, isa]) for i in (0, 1)] for r in row_counts}
            print("| model.extend pass | | | " + " | ".join(f"{1e3 * passes[r][0]:.2f} / {1e3 * passes[r][1]:.2f}"
                                                       for r in row_counts) + " |")
            print("| pass - products | | | " + " | ".join(
                f"{1e3 * (passes[r][0] - total[r][0]):.2f} / {1e3 * (passes[r][1] - total[r][1]):.2f}"
                for r in row_counts) + " |")
    print(f"\nload average {os.getloadavg()}")


if __name__ == "__main__":
    main()
