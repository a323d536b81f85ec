"""Random-case fuzzing of the attention kernels against kernels.reference, on CPU (interpret mode).

Not collected by pytest (too slow for CI: each case compiles anew); run by hand after a kernel change:

  python tests/fuzz_attention.py forward  [--seed S] [--seconds N]   pallas_tpu, pallas_gpu outputs (f32)
  python tests/fuzz_attention.py grad     [--seed S] [--seconds N]   their gradients (f32)
  python tests/fuzz_attention.py hopper   [--seed S] [--seconds N]   flash_hopper forward + backward (bf16;
                                                                     needs jax >= 0.11 for the interpreter)

Cases draw batch, heads (GQA groups of 1-4), head_dim, T, S and one of: arbitrary per-row intervals
(some empty), windows with lookahead past the row (image blocks), packed causal segments; caches get
shuffled positions with NaN-poisoned empty slots; the Hopper forward draws its options (paired tiles,
persistent CTAs). Tolerances: f32 2e-5 (outputs) and 1e-4 (gradients)
of the reference's scale; bf16 2e-2 (outputs) and 5e-2 (gradients). Prints each failure and a count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels  # noqa: E402
from kernels import blocks, reference  # noqa: E402


def intervals(rng, b, t, s):
    """k_start, k_end [b, t] for queries at the last t of s positions: one of three families."""
    pos = np.broadcast_to(np.arange(s - t, s), (b, t))
    kind = rng.integers(3)
    if kind == 0:  # arbitrary, about 1 in 8 rows empty
        ks = rng.integers(-10, s + 5, (b, t))
        return ks, ks + rng.integers(-s // 8 - 1, s // 2 + 1, (b, t))
    if kind == 1:  # window W with lookahead
        w, ahead = int(rng.integers(1, s + 10)), int(rng.integers(0, 20))
        return pos - w + 1, pos + ahead
    cuts = np.sort(rng.choice(np.arange(1, s), min(3, s - 1), replace=False))  # packed causal segments
    seg = np.zeros(s, np.int64)
    for c in cuts:
        seg[c:] = c
    return np.broadcast_to(seg[s - t:], (b, t)), pos


def case(rng, hopper: bool):
    b = int(rng.integers(1, 3))
    n, kv = [(4, 1), (4, 2), (2, 2), (8, 4), (2, 1)][rng.integers(5)]
    if hopper:  # self-attention over whole 128-row tiles
        t = s = 128 * int(rng.integers(1, 4))
        h = int(rng.choice([64, 128]))
    else:
        t = int(rng.integers(1, 160))
        s = t if rng.random() < 0.4 else int(rng.integers(t, 320))
        h = int(rng.choice([16, 48, 64, 80, 128]))
    ks, ke = intervals(rng, b, t, s)
    k_pos = None
    if s != t and rng.random() < 0.6:  # a cache: shuffled slots, some never written
        k_pos = np.stack([rng.permutation(s) for _ in range(b)])
        k_pos[rng.random((b, s)) < 0.2] = blocks.EMPTY
    softcap = None if hopper or rng.random() < 0.7 else float(rng.uniform(2, 30))
    options = {}  # the Hopper forward's: paired tiles (an even group), persistent CTAs
    if hopper and (n // kv) % 2 == 0 and rng.random() < 0.5:
        options["paired"] = True
    if hopper and rng.random() < 0.5:
        options["ctas"] = int(rng.integers(1, b * n * t // 128 + 1))
    return dict(b=b, t=t, s=s, n=n, kv=kv, h=h, ks=np.asarray(ks, np.int32), ke=np.asarray(ke, np.int32),
                k_pos=None if k_pos is None else np.asarray(k_pos, np.int32), softcap=softcap, options=options)


def arrays(c, seed, dtype):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    q = 2 * jax.random.normal(kq, (c["b"], c["t"], c["n"], c["h"]))
    k = 2 * jax.random.normal(kk, (c["b"], c["s"], c["kv"], c["h"]))
    v = jax.random.normal(kv, (c["b"], c["s"], c["kv"], c["h"]))
    dout = jax.random.normal(kd, q.shape)
    return [x.astype(dtype) for x in (q, k, v, dout)]


def empty_slots(c):
    return np.zeros((c["b"], c["s"], 1, 1), bool) if c["k_pos"] is None else (c["k_pos"] <= blocks.EMPTY)[..., None, None]


def attend(impl, c, poison):
    """(q, k, v) -> attention by `impl`; empty cache slots hold NaN (poison) or 0 (what the reference sees)."""
    empty = empty_slots(c)

    def f(q, k, v):
        k, v = (jnp.where(empty, jnp.nan if poison else 0.0, x) for x in (k, v))
        fn = reference.attention if impl == "xla" else lambda *a, **kw: kernels.attention(*a, impl=impl, **kw)
        return fn(q, k, v, c["ks"], c["ke"], scale=c["h"] ** -0.5, softcap=c["softcap"],
                  k_pos=None if c["k_pos"] is None else jnp.asarray(c["k_pos"]))

    return f


def scaled_err(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def forward(c, seed):
    q, k, v, _ = arrays(c, seed, jnp.float32)
    want = attend("xla", c, poison=False)(q, k, v)
    return {impl: (scaled_err(attend(impl, c, poison=True)(q, k, v), want), 2e-5) for impl in ("pallas_tpu", "pallas_gpu")}


def grad(c, seed):
    q, k, v, dout = arrays(c, seed, jnp.float32)
    empty = empty_slots(c)

    def grads(impl, poison):
        loss = lambda q, k, v: jnp.sum(attend(impl, c, poison)(q, k, v) * dout)  # noqa: E731
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    with jax.default_matmul_precision("highest"):
        want = grads("xla", poison=False)
    errs = {}
    for impl in ("pallas_tpu", "pallas_gpu"):
        got = grads(impl, poison=True)
        got = (got[0], *(jnp.where(empty, 0.0, g) for g in got[1:]))  # no gradient is asked of empty slots
        errs[impl] = (max(scaled_err(g, w) for g, w in zip(got, want)), 1e-4)
    return errs


def hopper(c, seed):
    from kernels import flash_hopper, flash_hopper_bwd
    q, k, v, dout = arrays(c, seed, jnp.bfloat16)
    scale = c["h"] ** -0.5
    with jax.disable_jit():  # the interpreter's warpgroups starve each other inside an outer jit on 2 cores
        o, lse = flash_hopper.forward(q, k, v, c["ks"], c["ke"], scale=scale, interpret=True, **c["options"])
        got = flash_hopper_bwd.backward(q, k, v, o, lse, dout, c["ks"], c["ke"], scale=scale, interpret=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    want_o = attend("xla", c, poison=False)(*f32[:3])
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda q, k, v: jnp.sum(attend("xla", c, poison=False)(q, k, v) * f32[3]), (0, 1, 2))(*f32[:3])
    errs = {f"d{n}": (scaled_err(g, w), 5e-2) for n, g, w in zip("qkv", got, want)}
    return {"forward": (scaled_err(o, want_o), 2e-2), **errs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("forward", "grad", "hopper"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=600)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    run = {"forward": forward, "grad": grad, "hopper": hopper}[args.mode]
    deadline, cases, fails = time.time() + args.seconds, 0, 0
    while time.time() < deadline:
        c = case(rng, hopper=args.mode == "hopper")
        shown = {k: v for k, v in c.items() if k not in ("ks", "ke", "k_pos")} | {"cache": c["k_pos"] is not None}
        try:
            bad = {name: f"{err:.2e} > {tol:.0e}" for name, (err, tol) in run(c, seed=cases).items() if not err <= tol}
            if bad:
                fails += 1
                print(f"FAIL {shown} {bad}", flush=True)
        except Exception as e:  # noqa: BLE001
            fails += 1
            print(f"ERROR {shown} {type(e).__name__}: {str(e)[:300]}", flush=True)
        cases += 1
    print(f"{args.mode}: {cases} cases, {fails} failures")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
