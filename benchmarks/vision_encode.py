"""Vision speed against HF transformers, in one run: SigLIP So400m encode of one 896 px image and the prefill
of a prompt with one image on the Gemma 3 4B layout reduced to 2 layers (1 local, 1 global); random weights, f32.

    /work/venv312/bin/python benchmarks/vision_encode.py [--hf-python /work/venv311/bin/python] [--repeats 3]

The HF peer (benchmarks/peer_hf_vision.py, torch CPU, sdpa attention) runs first as a subprocess, so the two
models (~5 GB each in f32) are never in memory together. Ours: `model.vision(pixels)` (jax.jit), the plain
`Transformer.forward` with last-position logits (jax.jit, exact prompt length) and `Sampler.prefill` of the
same prompt into a fresh cache (padded to its bucket; image encode included in both; HF: one
`model(..., logits_to_keep=1)` call). Both: best of --repeats after one warm-up call (ours: after compiling).
Prints one markdown table plus the JSON of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gemma import config as C  # noqa: E402
from gemma.sampler import Sampler  # noqa: E402
from gemma.sampler import _bucket  # noqa: E402
from gemma.transformer import Transformer  # noqa: E402


def best_of(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times), times


def sampler_bucket(n: int) -> int:
    return _bucket(n, 512)  # Sampler.prefill pads a prompt with images to this length (one chunk)


def run_peer(python: str, repeats: int, prompt_text: int) -> dict:
    cmd = [python, os.path.join(ROOT, "benchmarks", "peer_hf_vision.py"), "--repeats", str(repeats),
           "--prompt-text", str(prompt_text)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{type(e).__name__}: {getattr(e, 'stderr', '') or e}"[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(repeats: int, prompt_text: int) -> dict:
    import checkpoints

    config = C.gemma3_4b().replace(num_layers=2, layer_types=("local", "global"))
    t = time.perf_counter()
    model = Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    build_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.uniform(-1, 1, (1, 896, 896, 3)), jnp.float32)
    # jax.jit over split states: nnx.jit (model(...)) keeps a second copy of every parameter (see the report).
    graphdef, state = nnx.split(model)
    vgraph, vstate = nnx.split(model.vision)
    encode = jax.jit(lambda st, x: nnx.merge(vgraph, st)(x))
    encode_s, encode_all = best_of(lambda: encode(vstate, pixels), repeats)

    sampler = Sampler(model, checkpoints.load_tokenizer("gemma3-270m"), max_len=1024)
    text = rng.integers(3, 20000, 2 * prompt_text).tolist()
    row = [2] + text[:prompt_text] + [255_999] + text[prompt_text:]
    ids, _ = sampler.prepare(row, [np.zeros((8, 8, 3), np.uint8)])  # the image block layout; pixels are ours
    prefill_s, prefill_all = best_of(lambda: sampler.prefill([ids], sampler.new_cache(1, 1024),
                                                             np.asarray(pixels))[0], repeats)
    tokens = jnp.asarray([ids], jnp.int32)  # the plain forward at the exact prompt length (no bucket padding)
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    forward = jax.jit(lambda st, t, x: nnx.merge(graphdef, st).forward(t, positions, jnp.ones(t.shape, bool),
                                                                       True, False, x))
    forward_s, forward_all = best_of(lambda: forward(state, tokens, pixels), repeats)
    return dict(impl="ours", jax=jax.__version__, dtype="float32", attention_impl=config.attention_impl,
                build_s=round(build_s, 1), prompt_len=len(ids), prefill_bucket=int(sampler_bucket(len(ids))),
                encode_s=encode_s, encode_s_all=encode_all, prefill_s=prefill_s, prefill_s_all=prefill_all,
                forward_last_s=forward_s, forward_last_s_all=forward_all,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, loadavg=os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-python", default="/work/venv311/bin/python")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-text", type=int, default=24, help="text tokens before and after the image block")
    args = ap.parse_args()
    hf = run_peer(args.hf_python, args.repeats, args.prompt_text)
    us = ours(args.repeats, args.prompt_text)
    print("| implementation | encode 896 px (So400m) s | prefill, 1 image, 4B layout, 2 layers s | "
          "forward, last logits only s | prompt tokens |")
    print("|---|---|---|---|---|")
    print(f"| ours f32 (XLA:CPU) | {us['encode_s']:.2f} | {us['prefill_s']:.2f} (Sampler.prefill, padded to "
          f"{us['prefill_bucket']}) | {us['forward_last_s']:.2f} | {us['prompt_len']} |")
    if "error" in hf:
        print(f"| HF transformers f32 | not run: {hf['error'][:200]} | | | |")
    else:
        print(f"| HF transformers f32 ({hf['threads']} threads) | {hf['encode_s']:.2f} | {hf['prefill_s']:.2f} | "
              f"(same call) | {hf['prompt_len']} |")
        print(f"\nratios HF time / ours (> 1: ours faster): encode {hf['encode_s'] / us['encode_s']:.2f}x, "
              f"prefill {hf['prefill_s'] / us['prefill_s']:.2f}x (Sampler.prefill), "
              f"{hf['prefill_s'] / us['forward_last_s']:.2f}x (plain forward)")
    print(json.dumps({"ours": us, "hf": hf}))


if __name__ == "__main__":
    main()
