"""Attention kernels on a GPU: correctness against the reference, then timings with floors.

Run on a lent H100/H200 from the repo root:  python3 benchmarks/gpu_attention.py [--out DIR]
(`--smoke` runs every section at toy sizes on any backend, to check the script itself.)

Sections (each guarded, so one failure does not hide the rest):
  ceilings  device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here
  check     our kernels vs kernels.reference on random inputs: ||out - ref|| / ||ref||
  prefill   T = 32K, 8K; 8 q / 4 kv heads; head_dim 256; W = 1024; bf16; local and global layers:
            pallas_gpu vs cudnn vs xla (banded for local layers); forward and forward+backward.
            On a Hopper GPU pallas_gpu is flash_hopper's forward and flash_hopper_bwd's backward;
            "pallas_gpu triton" is the Triton forward and backward; "auto" is the default (on a Hopper
            GPU, kernels.hopper_route's choice)
  route     forward and forward+backward at the other shapes kernels.hopper_route was decided on
            (head_dim 128 windowed and causal, a short window at 256)
  decode    batch 8 over a 32K global cache and a 1024-slot ring: ours vs xla vs
            jax.experimental.pallas.ops.gpu.decode_attention.gqa; K/V bytes read per second
  target    the issue's target case alone: T = 32K, W = 1024 forward, every Hopper forward variant
            vs cudnn (HOPPER: "raw", flash_hopper.forward called directly; "persistent", one CTA per
            SM; "paired", a tile of 64 rows of two q heads of one kv head; "paired persistent")
  anatomy   the T = 32K local forward of each Hopper variant and cudnn at W = 512, 1024, 2048: a
            least-squares line through time vs key blocks streamed splits each variant's time into a
            cost per block and a fixed cost per tile (launch, Q in, O out, pipeline fill and drain);
            and the XLA work outside the kernel (the tile table) timed alone
  sweep     (with --sweep) the T = 32K local-layer forward per Triton (block_q, block_k, warps, stages)
Every time but the ceilings' is the mean over a loop of calls on the device (`bench_loop`), median of 5
loops.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

ROWS: list[str] = []
LOG: list[str] = []
SKIP: set[str] = set()  # impls left out (--skip), e.g. after a kernel hung in an earlier run
# Hopper forward variants (flash_hopper.forward options; "sms": one CTA per SM), forward only
# ("raw": pallas_gpu's own kernel, called without flash_gpu's wrapper: the wrapper's cost is the difference)
HOPPER = {"pallas_gpu raw": {}, "pallas_gpu persistent": {"ctas": "sms"}, "pallas_gpu paired": {"paired": True},
          "pallas_gpu paired persistent": {"paired": True, "ctas": "sms"}}


def say(line: str = "") -> None:
    print(line, flush=True)
    LOG.append(line)


def bench(f, *args, reps: int = 10) -> float:
    """Median wall seconds of a jitted call, after two warm-ups (compile excluded)."""
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_loop(f, *args, n: int = 20) -> float:
    """Seconds per call of f(x, *rest), from one jitted loop of n calls: no per-call dispatch in the
    time (per-call wall times of a sub-ms kernel moved by 40% between rounds on an H200, run G). x is
    carried through the loop and one element nudged in place each step, and the other arguments pass
    through an optimization barrier with it, so no work of f, not even what depends on `rest` alone
    (the tile tables from the intervals, cuDNN's band check), can be hoisted out of the loop, and no
    copy of x is timed."""
    def loop(x, *rest):
        def body(i, carry):
            x, acc = carry
            x, args = jax.lax.optimization_barrier((x.at[(0,) * x.ndim].add(i.astype(x.dtype)), rest))
            first = jax.tree.leaves(f(x, *args))[0]
            return x, acc + first.astype(jnp.float32)[(0,) * first.ndim]
        return jax.lax.fori_loop(0, n, body, (x, jnp.float32(0)))[1]
    return bench(jax.jit(loop), *args, reps=5) / n


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def verdict(errs, dtype) -> str:
    """"ok" when every relative error is within the dtype's bound (bf16 1e-2, f32 1e-4), else "WRONG"."""
    bound = 1e-4 if dtype == jnp.float32 else 1e-2
    return "ok" if all(e <= bound for e in errs) else "WRONG"


def band(b: int, t: int, window: int | None):
    """Causal (window) intervals of self-attention: k_start, k_end int32 [B, T]."""
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    start = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)
    return start, pos


def qkv(key, b, t, s, n, kv, h, dtype):
    kq, kk, kv_ = jax.random.split(key, 3)
    return (jax.random.normal(kq, (b, t, n, h), dtype), jax.random.normal(kk, (b, s, kv, h), dtype),
            jax.random.normal(kv_, (b, s, kv, h), dtype))


def ceilings(big: bool):
    n = (1 << 30) if big else (1 << 20)  # bf16 elements: 2 GiB
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + jnp.bfloat16(1))
    t = bench(copy, x)
    bw = 2 * x.nbytes / t
    m = 8192 if big else 256
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    c = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, c: a @ c)
    t = bench(mm, a, c)
    rate = 2 * m ** 3 / t
    say(f"ceilings: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    return bw, rate


def check(smoke: bool):
    """Our kernels vs the reference at moderate sizes, fresh random inputs each case (the reference
    runs at full f32 matmul precision: XLA on GPU would otherwise use TF32)."""
    with jax.default_matmul_precision("highest"):
        _check(smoke)


def _check(smoke: bool):
    t = 128 if smoke else 2048
    cases = [(jnp.bfloat16, 1024 if not smoke else 32), (jnp.bfloat16, None), (jnp.bfloat16, "ragged"),
             (jnp.float32, 1024 if not smoke else 32)]
    key = jax.random.key(7)
    start = time.time()
    for dtype, window in cases:  # a line per case with its start time: a run cut short shows where it was
        say(f"check case {jnp.dtype(dtype).name} W={window} starts at {time.time() - start:.0f} s")
        key, sub = jax.random.split(key)
        q, k, v = qkv(sub, 2, t, t, 8, 4, 256 if not smoke else 64, dtype)
        ragged = window == "ragged"
        window = (1024 if not smoke else 32) if ragged else window
        ks, ke = band(2, t, window)
        if ragged:  # left padding of 0 and t/3 + 5 rows (a whole empty tile), plus 3 padded rows at the end
            pad = jnp.array([[0], [t // 3 + 5]], jnp.int32)
            row = jnp.arange(t, dtype=jnp.int32)[None]
            ks = jnp.maximum(ks, pad)
            ke = jnp.where((row < pad) | (row >= t - 3), -1, ke)
        ref = reference.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), ks, ke,
                                  scale=q.shape[-1] ** -0.5)
        for impl in ("pallas_gpu", "pallas_gpu triton", "cudnn", *HOPPER):  # the variants new on a GPU last
            if (impl == "cudnn" and ragged) or impl in SKIP:
                continue
            if impl in HOPPER and (dtype == jnp.float32 or jax.default_backend() == "cpu"):
                continue
            try:
                out = prefill_fn(impl, window)(q, k, v, ks, ke)
                err = rel_err(out, ref)
                say(f"check {impl:17s} fwd  {jnp.dtype(dtype).name:8s} W={window}{' ragged' if ragged else ''}: "
                    f"rel err {err:.2e} {verdict([err], dtype)}")
            except Exception as e:  # noqa: BLE001
                say(f"check {impl:17s} fwd  {jnp.dtype(dtype).name} W={window}: FAILED {type(e).__name__}: {e}"[:400])
        grad_impls = {  # which impls' gradients this case checks (on a Hopper GPU pallas_gpu's bf16 backward
            "pallas_gpu": dtype == jnp.float32 or ragged,  # is flash_hopper_bwd, its f32 one Triton's)
            "pallas_gpu triton": dtype != jnp.float32 and ragged,
            "auto": dtype != jnp.float32 and not ragged,  # Hopper: hopper_route's (cudnn for W=None)
        }
        if any(grad_impls.values()):
            dout = jax.random.normal(key, q.shape, jnp.float32)

            def loss(q, k, v, impl):
                f = (lambda *a: reference.attention(*a, ks, ke, scale=q.shape[-1] ** -0.5)) if impl == "ref" else \
                    functools.partial(_prefill_fn, impl=impl, ks=ks, ke=ke, window=window)
                return jnp.sum(f(q, k, v) * dout)

            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            gref = jax.jit(jax.grad(lambda q, k, v: loss(q, k, v, "ref"), argnums=(0, 1, 2)))(*f32)
            for impl, wanted in grad_impls.items():
                if impl in SKIP or not wanted:
                    continue
                try:
                    g = jax.jit(jax.grad(lambda q, k, v, impl=impl: loss(q, k, v, impl), argnums=(0, 1, 2)))(q, k, v)
                    errs = [rel_err(a, b) for a, b in zip(g, gref)]
                    shown = ", ".join(f"d{n} {e:.2e}" for n, e in zip("qkv", errs))
                    say(f"check {impl} grad {jnp.dtype(dtype).name:8s} W={window}{' ragged' if ragged else ''}: "
                        f"rel err {shown} {verdict(errs, dtype)}")
                except Exception as e:  # noqa: BLE001
                    say(f"check {impl} grad: FAILED {type(e).__name__}: {e}"[:400])
    if "pallas_gpu" in SKIP:  # the decode checks are pallas_gpu's
        return
    say(f"check decode starts at {time.time() - start:.0f} s")
    # decode: ring after wrap-around and a ragged linear cache with a NaN-poisoned tail
    b, s, w = 4, (256 if smoke else 4096), (16 if smoke else 1024)
    key, sub = jax.random.split(key)
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = qkv(sub, b, 1, s, 8, 4, 256 if not smoke else 64, dtype)
        lengths = jnp.array([s, s - 3, s // 2 + 1, 5], jnp.int32)
        slot = jnp.arange(s, dtype=jnp.int32)[None]
        k_pos = jnp.where(slot < lengths[:, None], slot, -(2 ** 30))
        poison = (slot >= lengths[:, None])[..., None, None]
        kp, vp = jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v)
        ks, ke = jnp.zeros((b, 1), jnp.int32), (lengths - 1)[:, None]
        ref = reference.attention(q, jnp.where(poison, 0, k), jnp.where(poison, 0, v), ks, ke,
                                  scale=q.shape[-1] ** -0.5, k_pos=k_pos)
        try:
            out = jax.jit(lambda *a: kernels.attention(*a, ks, ke, k_pos=k_pos, impl="pallas_gpu"))(q, kp, vp)
            say(f"check decode linear {jnp.dtype(dtype).name:8s} ragged+NaN tail: rel err {rel_err(out, ref):.2e}")
        except Exception as e:  # noqa: BLE001
            say(f"check decode linear: FAILED {type(e).__name__}: {e}"[:400])
        # ring of w slots after writing positions 0..p-1 (p > 2w): slot j holds the largest position = j mod w
        p = 3 * w + 5
        qr, kfull, vfull = qkv(jax.random.fold_in(sub, 1), 1, 1, p, 8, 4, q.shape[-1], dtype)
        ring_pos = jnp.arange(w, dtype=jnp.int32) + w * ((p - 1 - jnp.arange(w)) // w)
        kr, vr = kfull[:, ring_pos], vfull[:, ring_pos]
        ks, ke = jnp.full((1, 1), p - w, jnp.int32), jnp.full((1, 1), p - 1, jnp.int32)
        ref = reference.attention(qr, kfull, vfull, ks, ke, scale=q.shape[-1] ** -0.5)
        try:
            out = jax.jit(lambda *a: kernels.attention(*a, ks, ke, k_pos=ring_pos[None], impl="pallas_gpu"))(qr, kr, vr)
            say(f"check decode ring   {jnp.dtype(dtype).name:8s} after wrap:      rel err {rel_err(out, ref):.2e}")
        except Exception as e:  # noqa: BLE001
            say(f"check decode ring: FAILED {type(e).__name__}: {e}"[:400])


def prefill_fn(impl: str, window: int | None):
    """jit of one prefill attention f(q, k, v, ks, ke). The intervals are arguments, as in a model: the
    work derived from them (our tile tables, cudnn's band check) runs in the timed call instead of being
    folded into constants at compile time (runs up to F captured them, so their times left it out)."""
    return jax.jit(lambda q, k, v, ks, ke: _prefill_fn(q, k, v, impl=impl, ks=ks, ke=ke, window=window))


def _prefill_fn(q, k, v, *, impl, ks, ke, window):
    """One prefill attention; "cudnn" calls jax.nn.dot_product_attention directly (no padding fallback)."""
    if impl == "cudnn":
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation=None if jax.default_backend() == "cpu" else "cudnn")
    if impl == "pallas_gpu triton":  # the Triton kernels, where pallas_gpu would take the Hopper ones
        from kernels import flash_gpu
        return flash_gpu.attention(q, k, v, ks, ke, scale=q.shape[-1] ** -0.5, mosaic=False, mosaic_backward=False,
                                   interpret=jax.default_backend() == "cpu")
    if impl in HOPPER:  # a variant of the Hopper forward (forward only)
        return hopper_forward(q, k, v, ks, ke, **HOPPER[impl])
    return kernels.attention(q, k, v, ks, ke, impl=impl, window=window, lookahead=0)  # a model's hints


def hopper_forward(q, k, v, ks, ke, ctas=None, paired=False):
    """flash_hopper.forward's output; ctas="sms": one CTA per SM of the device."""
    from kernels import flash_hopper
    if ctas == "sms":
        ctas = getattr(jax.devices()[0], "core_count", 132)
    return flash_hopper.forward(q, k, v, ks, ke, scale=q.shape[-1] ** -0.5, ctas=ctas, paired=paired)[0]


def prefill(smoke: bool, bw: float, rate: float):
    n, kvh, h, w = 8, 4, 256, 1024
    lengths = (512, 256) if smoke else (32768, 8192)  # the target case first
    if smoke:
        h, w = 64, 64
    for t in lengths:
        for window in (w, None):
            time_band(f"prefill T={t} {'local W=' + str(window) if window else 'global'}",
                      ("pallas_gpu", "auto", "pallas_gpu triton", "cudnn", "xla"), 1, t, n, kvh, h, window, bw, rate)


def visible_pairs(t: int, window: int | None) -> int:
    """(query, key) pairs a causal band over T positions holds: window W, or None (causal)."""
    w = min(window or t, t)
    return t * w - w * w // 2 if window else t * (t + 1) // 2


def time_band(name: str, impls, b: int, t: int, n: int, kvh: int, h: int, window: int | None, bw: float,
              rate: float):
    """Forward and forward + backward of each impl on one band case: random bf16 q, k, v [B, T, N / K, H]
    and dO; FLOPs of the visible pairs; floor from the measured ceilings."""
    q, k, v = qkv(jax.random.key(t), b, t, t, n, kvh, h, jnp.bfloat16)
    ks, ke = band(b, t, window)
    flops = 4 * b * n * h * visible_pairs(t, window)
    floor = max(flops / rate, 2 * (2 * b * t * n * h + 2 * b * t * kvh * h) / bw)
    dout = jax.random.normal(jax.random.key(1), q.shape, jnp.bfloat16)
    for impl in impls:
        if impl in SKIP:
            continue
        if impl == "xla" and window is None and t > 8192:
            say(f"{name:28s} {impl:17s} skipped (its T x T scores exceed memory)")
            continue
        f = prefill_fn(impl, window)
        time_row(name, impl, f, grad_fn(f), (q, k, v, ks, ke), flops, floor, grad_args=(dout,))


def grad_fn(f):
    """jit of the gradient in (q, k, v) of sum(f(q, k, v, ks, ke) * dout): forward + backward."""
    return jax.jit(jax.grad(lambda q, k, v, ks, ke, dout: jnp.sum(f(q, k, v, ks, ke).astype(jnp.float32) * dout),
                            argnums=(0, 1, 2)))


ROUTE_CASES = [  # (B, T, q heads, kv heads, head_dim, window): kernels.hopper_route's other evidence
    (2, 4096, 16, 8, 128, 1024),  # Gemma 3 27B's heads, windowed: ours (within noise of cuDNN, run G)
    (1, 16384, 32, 16, 128, None),  # 27B's heads, causal: cudnn
    (4, 2048, 8, 4, 256, 512),  # a short window at head_dim 256: ours
]


def route(smoke: bool, bw: float, rate: float):
    """Forward and forward + backward of ours (Hopper kernels), Triton's, cuDNN's and auto's at the
    shapes besides the prefill table's that kernels.hopper_route was decided on."""
    for b, t, n, kvh, h, w in ROUTE_CASES[1:] if smoke else ROUTE_CASES:  # smoke: a causal and a windowed case
        if smoke:
            t, n, kvh, h, w = 256, 4, 2, 64, w and 64
        time_band(f"route B={b} T={t} {n}/{kvh}x{h} {'W=' + str(w) if w else 'causal'}",
                  ("pallas_gpu", "pallas_gpu triton", "cudnn", "auto"), b, t, n, kvh, h, w, bw, rate)


def time_row(name: str, impl: str, f, fb, args, flops: float, floor: float, reps: int = 10,
             grad_args=()) -> float | None:
    """Times forward f (and forward+backward fb unless None, on args + grad_args) on args, each in a loop
    of calls on the device (`bench_loop`); prints a line and adds a table row. Returns the forward's
    seconds (None if it failed)."""
    try:
        tf = bench_loop(f, *args, n=reps)
        tbs = "(forward only)"
        if fb is not None:
            try:
                tbs = f"{bench_loop(fb, *args, *grad_args, n=5) * 1e3:9.2f} ms"
            except Exception as e:  # noqa: BLE001
                tbs = f"bwd failed: {type(e).__name__}"
        say(f"{name:28s} {impl:17s} fwd {tf * 1e3:8.3f} ms  fwd+bwd {tbs}  "
            f"fwd floor {floor * 1e3:.3f} ms ({flops / tf / 1e12:.0f} TFLOP/s)")
        ROWS.append(f"| {name} | {impl} | {tf * 1e3:.3f} | {tbs.replace(' ms', '')} | "
                    f"{floor * 1e3:.3f} | {flops / tf / 1e12:.0f} |")
        return tf
    except Exception as e:  # noqa: BLE001
        say(f"{name:28s} {impl:17s} FAILED {type(e).__name__}: {e}"[:400])
        ROWS.append(f"| {name} | {impl} | failed | | {floor * 1e3:.3f} | |")
        return None


def local_case(smoke: bool, window: int | None = None):
    """The issue's target case, T = 32K, B = 1, 8 q / 4 kv heads, H = 256, bf16 (toy sizes with --smoke):
    (q, k, v), (k_start, k_end), window, visible-pair FLOPs."""
    n, kvh, h, w, t = (8, 4, 64, 64, 512) if smoke else (8, 4, 256, 1024, 32768)
    w = window or w
    q, k, v = qkv(jax.random.key(t), 1, t, t, n, kvh, h, jnp.bfloat16)
    return (q, k, v), band(1, t, w), w, 4 * n * h * visible_pairs(t, w)


def forward_impls():
    """The forward impls the target and anatomy sections time: the Hopper ones on a GPU, and cudnn."""
    hopper = ("pallas_gpu", *HOPPER) if jax.default_backend() != "cpu" else ("pallas_gpu",)
    return [impl for impl in (*hopper, "cudnn") if impl not in SKIP]


def target(smoke: bool, bw: float, rate: float):
    """T = 32K, W = 1024 forward: every Hopper variant and cudnn, one after the other, twice (cudnn's time
    has moved by 25% between runs: the ratio is quoted from the same round)."""
    args, (ks, ke), w, flops = local_case(smoke)
    nbytes = 2 * sum(x.size for x in args) + 2 * args[0].size
    fns = {impl: prefill_fn(impl, w) for impl in forward_impls()}
    for rnd in range(2):
        times = {}
        for impl, f in fns.items():
            times[impl] = time_row(f"target T={args[0].shape[1]} W={w} round {rnd}", impl, f, None, (*args, ks, ke), flops,
                                   max(flops / rate, nbytes / bw))
        if times.get("cudnn"):
            say(f"target round {rnd}, speed vs cudnn (target 1.5x): " + ", ".join(
                f"{impl} {times['cudnn'] / sec:.2f}x" for impl, sec in times.items() if sec and impl != "cudnn"))


def anatomy(smoke: bool, rate: float):
    """Per variant, time vs key blocks streamed at several windows: per-block and per-tile costs."""
    from kernels import flash_hopper

    windows = (32, 64, 128) if smoke else (512, 1024, 2048)
    sms = getattr(jax.devices()[0], "core_count", 132)
    # the XLA work outside the kernel: the tile table from the intervals
    args, (ks, ke), w, _ = local_case(smoke)
    meta = jax.jit(lambda ks, ke: flash_hopper.tile_meta(ks, ke, flash_hopper.BLOCK_Q, flash_hopper.BLOCK_K))
    say(f"anatomy tile_meta alone (T={args[0].shape[1]}): {bench_loop(meta, ks, ke) * 1e6:.1f} us")
    for impl in forward_impls():
        points = []
        for window in windows:
            args, (ks, ke), w, flops = local_case(smoke, window)
            b, t, n = args[0].shape[:3]
            try:
                sec = bench_loop(prefill_fn(impl, w), *args, ks, ke)
            except Exception as e:  # noqa: BLE001
                say(f"anatomy {impl} W={w}: FAILED {type(e).__name__}: {e}"[:400])
                break
            paired = HOPPER.get(impl, {}).get("paired", False)
            meta = np.asarray(flash_hopper.tile_meta(ks, ke, flash_hopper.BLOCK_Q, flash_hopper.BLOCK_K, paired=paired))
            tiles = b * (n // 2 if paired else n) * meta.shape[2]  # work items
            steps = int(np.sum(meta[:, 1] - meta[:, 0])) * (n // 2 if paired else n)  # K/V blocks streamed
            points.append((steps, tiles, sec))
            say(f"anatomy {impl:28s} W={w:5d}: {sec * 1e3:7.3f} ms  {flops / sec / 1e12:4.0f} TFLOP/s"
                + ("" if impl == "cudnn" else f"  {steps} K/V blocks streamed over {tiles} tiles"))
        if len(points) >= 2 and impl != "cudnn":
            x = np.array([p[0] for p in points], np.float64)
            y = np.array([p[2] for p in points], np.float64)
            slope, intercept = np.polyfit(x, y, 1)
            per_sm_block = slope * sms  # seconds one SM spends per block (both warpgroups' rows)
            say(f"anatomy {impl:28s} fit: {per_sm_block * 1e6:.2f} us per block per SM "
                f"({4 * 2 * flash_hopper.BLOCK_Q * flash_hopper.BLOCK_K * args[0].shape[-1] / per_sm_block / 1e12 * sms:.0f} "
                f"TFLOP/s of streamed blocks across {sms} SMs), fixed {intercept * 1e6:.1f} us "
                f"= {intercept * sms / points[0][1] * 1e6:.2f} us per tile per SM")


SWEEP = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 2), (128, 128, 8, 2),
         (64, 32, 4, 3), (128, 32, 8, 3), (64, 128, 4, 2)]  # (block_q, block_k, num_warps, num_stages)


def sweep(smoke: bool, rate: float):
    """Forward time of pallas_gpu at T = 32K, local W = 1024 (the issue's target case) per Triton config."""
    from kernels import flash_gpu

    (q, k, v), (ks, ke), w, flops = local_case(smoke)
    t, h = q.shape[1], q.shape[-1]
    for bq, bk, warps, stages in SWEEP:
        f = jax.jit(lambda q, k, v, ks, ke, bq=bq, bk=bk, warps=warps, stages=stages: flash_gpu.attention(
            q, k, v, ks, ke, scale=h ** -0.5, block_q=bq, block_k=bk, num_warps=warps, num_stages=stages,
            interpret=jax.default_backend() == "cpu"))
        time_row(f"sweep T={t} local W={w}", f"pallas_gpu {bq}x{bk} w{warps} s{stages}", f, None, (q, k, v, ks, ke),
                 flops, flops / rate, reps=5)


def decode(smoke: bool, bw: float):
    from jax.experimental.pallas.ops.gpu import decode_attention as jdecode

    b, n, kvh, h = 8, 8, 4, 256
    s_global, w = (1024, 64) if smoke else (32768, 1024)
    if smoke:
        h = 64
    interpret = jax.default_backend() == "cpu"
    for layer, s in (("global", s_global), ("ring", w)):
        q, k, v = qkv(jax.random.key(s), b, 1, s, n, kvh, h, jnp.bfloat16)
        if layer == "global":
            lengths = jnp.full((b,), s, jnp.int32) - jnp.arange(b, dtype=jnp.int32) * (s // 16)
            k_pos = jnp.where(jnp.arange(s)[None] < lengths[:, None], jnp.arange(s, dtype=jnp.int32)[None],
                              -(2 ** 30))
            ks, ke = jnp.zeros((b, 1), jnp.int32), (lengths - 1)[:, None]
        else:  # a full ring after wrap-around: query at position p sees the W slots
            p = jnp.full((b,), 5 * w + 17, jnp.int32)
            slot = jnp.arange(w, dtype=jnp.int32)[None]
            k_pos = slot + w * ((p[:, None] - 1 - slot) // w)
            lengths = jnp.full((b,), w, jnp.int32)
            ks, ke = (p - w)[:, None], (p - 1)[:, None]
        nbytes = 2 * int(jnp.sum(lengths)) * kvh * h * 2  # K and V, bf16
        floor = nbytes / bw
        ref = reference.attention(q, k, v, ks, ke, scale=h ** -0.5, k_pos=k_pos)
        runs = {
            "pallas_gpu": jax.jit(lambda q, k, v: kernels.attention(q, k, v, ks, ke, k_pos=k_pos, impl="pallas_gpu")),
            "xla": jax.jit(lambda q, k, v: kernels.attention(q, k, v, ks, ke, k_pos=k_pos, impl="xla")),
            "jax gqa": jax.jit(lambda q, k, v: jdecode.gqa(q[:, 0], k, v, kv_seq_len=lengths,
                                                          k_splits=min(16, s // 16), interpret=interpret)[:, None]),
        }
        for name, f in runs.items():
            try:
                err = rel_err(f(q, k, v), ref)  # jax gqa on the full ring: every slot visible, order irrelevant
                t = bench_loop(f, q, k, v)
                say(f"decode B={b} {layer:6s} S={s:6d} {name:10s} {t * 1e6:9.1f} us  rel err {err:.1e}  "
                    f"K/V {nbytes / t / 1e12:.2f} TB/s = {nbytes / t / bw:.0%} of copy bw (floor {floor * 1e6:.1f} us)")
                ROWS.append(f"| decode B={b} {layer} S={s} | {name} | {t * 1e6:.1f} us | | {floor * 1e6:.1f} us | "
                            f"{nbytes / t / bw:.0%} of bw |")
            except Exception as e:  # noqa: BLE001
                say(f"decode {layer} {name}: FAILED {type(e).__name__}: {e}"[:400])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time the local-layer forward per Triton config")
    ap.add_argument("--sections", default="ceilings,check,prefill,decode", help="comma-separated sections to run")
    ap.add_argument("--skip", default="", help="comma-separated impls to leave out of check and prefill")
    args = ap.parse_args()
    SKIP.update(filter(None, args.skip.split(",")))
    say(f"jax {jax.__version__}, devices {jax.devices()}")
    from kernels import flash_hopper
    say(f"pallas_gpu forward on this device: {'Hopper kernel (Mosaic GPU)' if flash_hopper.on_hopper() else 'Triton'}")
    t0 = time.time()
    bw, rate = 3e12, 8e14
    for section in (*args.sections.split(","), *(("sweep",) if args.sweep else ())):
        try:
            if section == "sweep":
                sweep(args.smoke, rate)
            elif section == "target":
                target(args.smoke, bw, rate)
            elif section == "anatomy":
                anatomy(args.smoke, rate)
            elif section == "ceilings":
                bw, rate = ceilings(not args.smoke)
            elif section == "check":
                check(args.smoke)
            elif section == "route":
                route(args.smoke, bw, rate)
            elif section == "prefill":
                prefill(args.smoke, bw, rate)
            elif section == "decode":
                decode(args.smoke, bw)
            else:
                say(f"unknown section {section}")
        except Exception:  # noqa: BLE001
            say(f"section {section} FAILED:\n{traceback.format_exc()[-1500:]}")
        say(f"[{section} done at {time.time() - t0:.0f} s]")
    table = ["| case | impl | fwd ms | fwd+bwd ms | floor | rate |", "|---|---|---|---|---|---|", *ROWS]
    say("\n".join(table))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gpu_attention_{args.sections.replace(',', '_')}.md"), "w") as f:
        f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
