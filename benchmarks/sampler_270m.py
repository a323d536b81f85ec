"""Decode / prefill speed of our Sampler on the real Gemma 3 270M against peers, in one run.

    .venv/bin/python benchmarks/sampler_270m.py [--hf-python /work/venv311/bin/python]
                                                [--official-python /work/venv_gemma/bin/python]

Prints a markdown table (paste it into benchmarks/RESULTS.md). Decode on CPU is
bound by memory bandwidth: every token reads every weight, the 168M-parameter
tied embedding included, so each decode figure is printed beside its floor =
(bandwidth XLA streams on all cores) / (bytes of weights read per token).
Peers run as subprocesses of this script (HF transformers needs torch, the
official `gemma` package its own venv); a missing peer is reported, not faked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import checkpoints  # noqa: E402
from gemma import config as C  # noqa: E402
from gemma.cache import cache_nbytes  # noqa: E402
from gemma.sampler import Sampler, SamplingParams, _bucket, _decode_loop  # noqa: E402

NEW_TOKENS = 32


def best_of(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth_gbs() -> float:
    """GB/s of a jitted f32 matrix-vector product over a [262144, 640] table (the 270M embedding)."""
    table = jax.random.normal(jax.random.key(0), (C.VOCAB_SIZE, 640), jnp.float32)
    x = jnp.ones((1, 640), jnp.float32)
    f = jax.jit(lambda x, e: jnp.einsum("TD,VD->TV", x, e))
    return table.nbytes / best_of(lambda: f(x, table), 5) / 1e9


def decode_tok_s(sampler: Sampler, batch: int, steps: int = NEW_TOKENS) -> float:
    rows = [list(np.random.default_rng(b).integers(3, 20000, 16)) for b in range(batch)]

    def run():
        cache = sampler.new_cache(batch, 16 + steps)
        logits, cache = sampler.prefill(rows, cache)
        jax.block_until_ready(logits)
        t = time.perf_counter()
        out, _ = _decode_loop(sampler._model_key, sampler._leaves, cache, logits, jax.random.key(0),
                              jnp.asarray([-1], jnp.int32), SamplingParams(), _bucket(steps, 1 << 30),
                              jnp.int32(steps), jnp.zeros((batch,), bool))
        jax.block_until_ready(out)
        return time.perf_counter() - t

    run()
    return batch * steps / min(run() for _ in range(2))


def prefill_512_s(sampler: Sampler) -> float:
    row = list(np.random.default_rng(0).integers(3, 20000, 512))
    return best_of(lambda: sampler.prefill([row], sampler.new_cache(1, 512))[0])


def peer(python: str | None, script: str, *args: str) -> dict:
    if not python or not os.path.exists(python):
        return {"error": f"peer interpreter {python!r} not found"}
    proc = subprocess.run([python, os.path.join(ROOT, "benchmarks", script), *args], capture_output=True,
                          text=True, cwd="/tmp", timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-400:]}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-python", default="/work/venv311/bin/python")
    ap.add_argument("--official-python", default="/work/venv_gemma/bin/python")
    args = ap.parse_args()

    bw = bandwidth_gbs()
    rows = []
    tokenizer = checkpoints.load_tokenizer("gemma3-270m")
    n_params = 268_098_176
    for dtype in (jnp.float32, jnp.bfloat16):
        model = checkpoints.load("gemma3-270m", dtype=dtype)
        sampler = Sampler(model, tokenizer)
        floor = bw * 1e9 / (n_params * jnp.dtype(dtype).itemsize)
        name = jnp.dtype(dtype).name
        b1, b8 = decode_tok_s(sampler, 1), decode_tok_s(sampler, 8)
        rows.append((f"ours {name}", b1, b8, prefill_512_s(sampler), floor))
        del model, sampler
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    hf = peer(args.hf_python, "peer_hf.py", "--threads", "2", "--new-tokens", str(NEW_TOKENS))
    official = {d: peer(args.official_python, "peer_official_gemma.py", "--gguf", "auto", "--tokens",
                        str(NEW_TOKENS), "--batch", "1", "--dtype", d) for d in ("float32", "bfloat16")}

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"load average {os.getloadavg()}")
    print(f"XLA f32 matrix-vector bandwidth: {bw:.1f} GB/s; f32 floor {bw * 1e9 / (n_params * 4):.1f} tok/s, "
          f"bf16 floor {bw * 1e9 / (n_params * 2):.1f} tok/s (batch 1)\n")
    print("| implementation | decode b1 tok/s | % of floor | decode b8 tok/s (total) | prefill 512 s |")
    print("|---|---|---|---|---|")
    for name, b1, b8, pf, floor in rows:
        print(f"| {name} | {b1:.1f} | {100 * b1 / floor:.0f}% | {b8:.1f} | {pf:.2f} |")
    if "error" in hf:
        print(f"| HF transformers f32 | error: {hf['error'][-120:]!r} | | | |")
    else:
        print(f"| HF transformers f32 (torch {hf['torch']}) | {hf['decode_b1_tok_s']:.1f} | "
              f"{100 * hf['decode_b1_tok_s'] / rows[0][4]:.0f}% | {hf['decode_b8_tok_s']:.1f} | "
              f"{hf['prefill_512_s']:.2f} |")
    for d, res in official.items():
        if "error" in res:
            print(f"| official gemma {d} | error: {res['error'][-120:]!r} | | | |")
        else:
            print(f"| official gemma {d} ({res.get('weights', '?')} weights) | {res.get('decode_tok_s', float('nan')):.1f}"
                  f" | | | |")
    if "error" not in hf:
        print(f"\nratios, ours / HF f32: b1 {rows[0][1] / hf['decode_b1_tok_s']:.2f}x, "
              f"b8 {rows[0][2] / hf['decode_b8_tok_s']:.2f}x, prefill {hf['prefill_512_s'] / rows[0][3]:.2f}x faster")
    if "error" not in official["bfloat16"]:
        print(f"ratio, ours bf16 / official bf16 b1: {rows[1][1] / official['bfloat16']['decode_tok_s']:.2f}x")
    print(f"peak RSS: ours {ours_rss:.2f} GiB (both dtypes in one process), HF {hf.get('peak_rss_gib', float('nan')):.2f} GiB")

    cfg = C.gemma3_270m()
    full = cfg.replace(layer_types=("global",) * cfg.num_layers)
    print("\nKV cache bytes, 270M, batch 1, f32:")
    for n in (4096, 32768):
        hf_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * 4 * (
            cfg.num_global_layers * n + cfg.num_local_layers * min(cfg.sliding_window - 1, n))
        print(f"  {n // 1024}K: ours {cache_nbytes(cfg, 1, n, jnp.float32) / 2**20:.1f} MiB | "
              f"HF (sliding layers keep W-1) {hf_bytes / 2**20:.1f} MiB | "
              f"official layout (every layer full) {cache_nbytes(full, 1, n, jnp.float32) / 2**20:.1f} MiB")


if __name__ == "__main__":
    from kernels import cpu_build

    cpu_build.prefer_memory_scheduler()  # as the command line does
    main()
