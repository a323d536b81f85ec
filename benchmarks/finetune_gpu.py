"""Full fine-tuning of Gemma 3 1B (random weights) on one accelerator: training tokens/s and MFU.

    python benchmarks/finetune_gpu.py [--model 1b] [--seq-len 2048] [--batch-size 8] [--steps 5]
                                      [--remat full|dots|none] [--dtype bfloat16] [--peak-tflops P]
    python benchmarks/finetune_gpu.py --smoke       # a tiny config on any backend, to check the script

The issue's GPU target (>= 40% MFU at seq 2048). The Trainer's own step (gemma.train.trainer: AdamW, f32
master weights and optimizer state, `--dtype` compute, the chunked cross-entropy, `--remat`), random token
batches (every position a loss token), one warm-up step (compiles), then `--steps` timed steps (median).

MFU = model FLOPs of a step / step time / the device's peak dense rate in `--dtype`, with model FLOPs

    6 * P * T + 3 * 4 * heads * head_dim * pairs          (forward + backward; no remat recompute counted)

P = the parameters of the step's matmuls (every projection plus the tied 262144 x d head), T = tokens of the
step, pairs = the visible (query, key) pairs summed over layers (a local layer's window of the config's
sliding_window, a global layer's causal triangle). Peak: --peak-tflops, else from the device kind (NVIDIA
H100 / H200: 989 TFLOP/s bf16 dense, the SXM data sheets' figure). Prints one JSON line and a table row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM


def visible_pairs(cfg, seq: int) -> int:
    """(query, key) pairs a row of `seq` tokens scores, summed over the config's layers."""
    causal = seq * (seq + 1) // 2
    w = min(cfg.sliding_window, seq)
    local = causal - (seq - w) * (seq - w + 1) // 2  # keys j with i - W < j <= i
    return sum(local if t == "local" else causal for t in cfg.layer_types)


def model_flops(cfg, batch: int, seq: int) -> dict:
    d, f, h, n, k = cfg.d_model, cfg.hidden_dim, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    p = cfg.num_layers * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f) + cfg.vocab_size * d
    dense = 6 * p * batch * seq
    attention = 3 * 4 * n * h * batch * visible_pairs(cfg, seq)
    return {"matmul_params": p, "dense": dense, "attention": attention, "total": dense + attention}


def peak_flops(device, dtype: str, given: float | None) -> float | None:
    if given is not None:
        return given * 1e12
    if dtype != "bfloat16":
        return None
    kind = getattr(device, "device_kind", "")
    return next((v * 1e12 for name, v in PEAK_BF16_TFLOPS.items() if name in kind), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b", help="a gemma.config preset (random weights)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="full", help="a REMAT_POLICIES name, or none")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense rate in --dtype")
    ap.add_argument("--smoke", action="store_true", help="a tiny config, seq 64, batch 2, 2 steps")
    args = ap.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    from gemma import config as gconfig
    from gemma.train import data, trainer
    from gemma.transformer import Transformer

    if args.smoke:
        cfg = gconfig.tiny(vocab_size=512)
        args.seq_len, args.batch_size, args.steps = 64, 2, 2
    else:
        cfg = gconfig.preset(args.model)
    b, s = args.batch_size, args.seq_len
    remat = None if args.remat == "none" else args.remat
    t0 = time.perf_counter()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tc = trainer.TrainConfig(steps=1000, batch_size=b, seq_len=s, learning_rate=1e-5, compute_dtype=args.dtype,
                             remat=remat)
    tr = trainer.Trainer(model, tc)
    del model
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (b, s + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
    batch = data.Batch(ids[:, :-1], ids[:, 1:], np.ones((b, s), np.float32), pos, np.ones((b, s), np.int32))
    t = time.perf_counter()
    first = tr.step([batch])
    first_s = time.perf_counter() - t
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        m = tr.step([batch])  # returns host floats: the step is finished
        times.append(time.perf_counter() - t)
        losses.append(m["loss"])
    step_s = statistics.median(times)
    f = model_flops(cfg, b, s)
    device = jax.devices()[0]
    peak = peak_flops(device, args.dtype, args.peak_tflops)
    mfu = f["total"] / step_s / peak if peak else None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    out = {"model": "tiny" if args.smoke else args.model, "device": getattr(device, "device_kind", str(device)),
           "platform": device.platform, "jax": jax.__version__, "seq_len": s, "batch_size": b, "remat": remat,
           "dtype": args.dtype, "init_s": init_s, "first_step_s": first_s, "step_s": step_s, "step_times": times,
           "tokens_per_s": b * s / step_s, "flops": f, "achieved_tflops": f["total"] / step_s / 1e12,
           "peak_tflops": peak / 1e12 if peak else None, "mfu": mfu, "loss_first": first["loss"], "losses": losses,
           "peak_device_gib": (stats or {}).get("peak_bytes_in_use", 0) / 2**30 or None}
    print(json.dumps(out), flush=True)
    print(f"| {out['model']} full FT | {out['device']} | {args.dtype} | {b} x {s} | remat {remat} | "
          f"{step_s:.3f} s | {out['tokens_per_s']:.0f} tok/s | {out['achieved_tflops']:.1f} TFLOP/s | "
          f"MFU {'%.1f%%' % (100 * mfu) if mfu is not None else 'n/a (no peak known)'} |")
    if not all(np.isfinite(losses)):
        print("non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
