"""Logit error of our real Gemma 3 270M against HF transformers' fixtures, per prompt, plus forward timing.

    .venv/bin/python benchmarks/parity_270m.py [--dtype float32|bfloat16]

For each fixture prompt: max |ours - HF| over HF's top-64 logits at the stored
positions, the logsumexp error, teacher-forced greedy agreement over 32 steps,
and our greedy `Sampler.generate` ids vs HF's generate ids.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402

import checkpoints  # noqa: E402
import gemma  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures", "gemma3_270m")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    ref = json.load(open(os.path.join(FIX, "reference.json")))
    npz = np.load(os.path.join(FIX, "reference.npz"))
    model = checkpoints.load("gemma3-270m", dtype=jnp.dtype(args.dtype))
    tokenizer = checkpoints.load_tokenizer("gemma3-270m")
    sampler = gemma.Sampler(model, tokenizer, max_len=2048)
    print(f"dtype {args.dtype}")
    print("| prompt | tokens | max abs logit error (top-64, stored positions) | logsumexp error | "
          "teacher-forced argmax agreement | generate ids == HF |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for i, p in enumerate(ref["prompts"]):
        ids, pos = npz[f"p{i}_ids"].tolist(), npz[f"p{i}_positions"]
        gen = npz[f"p{i}_gen_ids"][: p["gen_len"]].tolist()
        hidden = model(jnp.asarray([ids + gen]), return_hidden=True)[0]
        steps = len(ids) - 1 + np.arange(len(gen))
        logits = np.asarray(model.embedder.decode(hidden[None, jnp.asarray(np.concatenate([pos, steps]))])[0])
        at_pos, at_steps = logits[: len(pos)], logits[len(pos):]
        err = np.abs(np.take_along_axis(at_pos, npz[f"p{i}_top64_indices"], 1) - npz[f"p{i}_top64_values"]).max()
        err_tf = np.abs(np.take_along_axis(at_steps, npz[f"p{i}_tf_top16_indices"][: len(gen)], 1)
                        - npz[f"p{i}_tf_top16_values"][: len(gen)]).max()
        lse = np.abs(np.asarray(logsumexp(at_pos, axis=1)) - npz[f"p{i}_lse"]).max()
        agree = int((at_steps.argmax(1) == np.asarray(gen)).sum())
        ours = sampler.generate(ids, max_new_tokens=len(gen)).tokens
        first = next((s for s, (a, b) in enumerate(zip(ours, gen)) if a != b), None)
        same = "yes" if ours == gen else f"until step {first} (HF top-2 gap {npz[f'p{i}_gen_top2_gap'][first]:.3f})"
        worst = max(worst, err, err_tf)
        print(f"| {p['name']} | {len(ids)} | {max(err, err_tf):.2e} | {lse:.2e} | {agree}/{len(gen)} | {same} |")
    print(f"\nworst logit error: {worst:.2e}")
    tokens = jnp.asarray([npz["p7_ids"][:512].tolist()])
    full = min(timed(lambda: model(tokens)) for _ in range(3))
    last = min(timed(lambda: model(tokens, last_only=True)) for _ in range(3))
    print(f"forward of 512 tokens: {full:.2f} s with all logits, {last:.2f} s with the last position's only")


def timed(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
