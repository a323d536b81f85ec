"""Once-run check: the official `gemma` package writes a random init of its real Gemma3_4B preset, our
`checkpoints.load` reads it, and both forwards are compared on a short text prompt with one 896 px image.

    /work/venv312/bin/python benchmarks/official_checkpoint_4b.py --dtype bfloat16            # full 4B
    /work/venv312/bin/python benchmarks/official_checkpoint_4b.py --dtype float32 --layers 6  # 4B widths, f32

Three subprocesses, one after the other, so that no two models are ever in memory together: the official
init + save and the official forward (its own venv, --official-python, default /work/venv_gemma/bin/python),
then ours (this interpreter). A watchdog kills a half when the machine's MemAvailable falls under
--min-free-gib (the machine is shared) and the run reports it. Official half:
`gm.nn.Gemma3_4B(config=..., dtype)` (the preset's config; with --layers N < 34 only its attention_types
shortened to N layers of the same 5 local : 1 global pattern), `model.init` with PRNGKey(--seed), run eagerly
(jax.disable_jit: the jitted init of the bf16 4B asks XLA for a 33 GB buffer) (the package's own random init: text in `dtype`, the vision encoder and mm projection in f32, as the package
keeps them), `gm.ckpts.save_params` (the nested layout of a fine-tune); then, in a fresh process,
`gm.ckpts.load_params` and its forward
`model.apply(..., tokens, images=uint8 [1, 1, 896, 896, 3], return_hidden_states=True)`, computed in
`dtype` (its text activations follow the param dtype; its vision encoder runs in f32). Our half:
`checkpoints.load(dir, dtype=dtype)` (config inferred from the tree), the same prompt (the official
expansion, -2 -> our soft-token id) and pixels (`vision.preprocess`; the official resize of an 896 px image is
the identity), the plain forward (`Transformer.forward` under jax.jit of the split state) in `dtype` (ours
runs the vision tower in `dtype` too).

Prints one JSON line: config inference, max |logit diff| over the prompt's text positions and the 262144
official columns, top-1 agreement, and the timings of both halves. RAM: bf16 full 4B ~10-12 GB per half.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOI = 255_999


def prompt(seed: int, n_text: int) -> tuple[list[int], "np.ndarray"]:  # noqa: F821
    import numpy as np

    rng = np.random.default_rng(seed)
    text = rng.integers(3, 200_000, 2 * n_text).tolist()
    image = rng.integers(0, 256, (28, 28, 3)).repeat(32, 0).repeat(32, 1).astype(np.uint8)  # 896 px, 32 px blocks
    return [2] + text[:n_text] + [BOI] + text[n_text:], image


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------- official half (venv_gemma)
def official_half(args) -> None:
    """--official-half init: init + save; --official-half forward: load_params + forward."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]  # the official package is `gemma` too
    import dataclasses
    from importlib import metadata

    import jax
    import jax.numpy as jnp
    import numpy as np
    from gemma import gm
    from gemma.gm.nn import _config, _gemma
    from gemma.gm.utils import _types
    from gemma.gm.vision import _token_utils

    dtype = jnp.dtype(args.dtype)
    config = gm.nn.Gemma3_4B().config
    if args.layers != config.num_layers:
        config = dataclasses.replace(config, attention_types=_config.make_attention_layers_types(
            _gemma.GEMMA3_ATTENTION_PATTERN, num_layers=args.layers))
    model = gm.nn.Gemma3_4B(config=config, dtype=dtype)
    ckpt = os.path.join(args.work, "ckpt")
    if args.official_half == "init":
        t = time.perf_counter()
        # Eagerly: under the package's nn.jit, XLA asks for one 33 GB buffer to init the bf16 4B.
        with jax.disable_jit():
            params = model.init(jax.random.key(args.seed), tokens=jnp.ones((1, 4), jnp.int32))["params"]
        params = jax.block_until_ready(params)
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        gm.ckpts.save_params(params, ckpt, wait_until_finished=True)
        save_s = time.perf_counter() - t
        json.dump(dict(versions={n: metadata.version(n) for n in ("gemma", "jax", "flax", "orbax-checkpoint")},
                       num_params=int(sum(x.size for x in jax.tree.leaves(params))), init_s=init_s, save_s=save_s,
                       init_save_peak_rss_gib=rss_gib(), layout=sorted(params)[:3] + ["..."],
                       checkpoint_bytes=sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())),
                  open(os.path.join(args.work, "official_init.json"), "w"))
        return
    t = time.perf_counter()
    params = jax.block_until_ready(gm.ckpts.load_params(ckpt))
    load_s = time.perf_counter() - t
    tokens, image = prompt(args.seed, args.text_tokens)
    tokens = jnp.asarray([tokens], jnp.int32)
    images = jnp.asarray(image)[None, None]
    t = time.perf_counter()
    out = model.apply({"params": params}, tokens=tokens, images=images, return_hidden_states=True)
    logits = np.asarray(jax.block_until_ready(out.logits)[0], np.float32)
    forward_s = time.perf_counter() - t
    with_mm = _types.Input(text=tokens, images=images, config=model.config.input_config).tokens_with_mm
    text_index = _token_utils._get_new_text_tokens_positions(offset_on=tokens[0] == BOI, offset_by=256 + 3)
    np.savez(os.path.join(args.work, "official.npz"), logits=logits, tokens_with_mm=np.asarray(with_mm[0]),
             text_index=np.asarray(text_index), hidden=np.asarray(out.hidden_states[0], np.float32))
    info = json.load(open(os.path.join(args.work, "official_init.json")))
    info.update(load_params_s=load_s, forward_s_incl_compile=forward_s, forward_peak_rss_gib=rss_gib())
    json.dump(info, open(os.path.join(args.work, "official.json"), "w"))


# ---------------------------------------------------------------------- our half (this project's venv)
def our_half(args) -> None:
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import checkpoints
    import vision
    from gemma.config import gemma3_4b

    dtype = jnp.dtype(args.dtype)
    ref = dict(np.load(os.path.join(args.work, "official.npz")))
    t = time.perf_counter()
    model = checkpoints.load(os.path.join(args.work, "ckpt"), dtype=dtype)
    load_s, load_rss = time.perf_counter() - t, rss_gib()
    c, preset = model.config, gemma3_4b()
    inferred = {k: getattr(c, k) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                                             "hidden_dim", "sliding_window", "rope_global_scale", "vocab_size",
                                             "query_pre_attn_scalar")}
    same_as_preset = c == preset.replace(num_layers=c.num_layers, layer_types=c.layer_types,
                                         attention_impl=c.attention_impl)
    _, image = prompt(args.seed, args.text_tokens)
    pixels = jnp.asarray(vision.preprocess(image, 896)[None], dtype)
    tokens = np.where(ref["tokens_with_mm"] == -2, c.image_token_id, ref["tokens_with_mm"])
    # jax.jit over the split state: nnx.jit (what model(...) uses) keeps a second copy of every parameter,
    # which the bf16 4B cannot afford next to its forward on this 24 GB machine.
    graphdef, state = nnx.split(model)

    @jax.jit
    def hidden_states(state, tokens, pixels):
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        return nnx.merge(graphdef, state).forward(tokens, positions, jnp.ones(tokens.shape, bool), False, True,
                                                  pixels)[0]

    t = time.perf_counter()
    hidden = hidden_states(state, jnp.asarray(tokens, jnp.int32)[None], pixels)
    logits = model.embedder.decode(hidden[jnp.asarray(ref["text_index"])][None])[0, :, :ref["logits"].shape[-1]]
    logits = np.asarray(jax.block_until_ready(logits), np.float32)
    forward_s = time.perf_counter() - t
    diff = np.abs(logits - ref["logits"])
    json.dump(dict(dtype=args.dtype, layers=c.num_layers, prompt_tokens=len(tokens), text_positions=len(logits),
                config_inferred=inferred, config_equals_4b_preset_but_layers=bool(same_as_preset),
                max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
                max_abs_logit=float(np.abs(ref["logits"]).max()), logit_std=float(ref["logits"].std()),
                top1_agreement=float((logits.argmax(-1) == ref["logits"].argmax(-1)).mean()),
                max_abs_hidden_diff=float(np.abs(np.asarray(hidden, np.float32)[ref["text_index"]]
                                                 - ref["hidden"]).max()),
                ours=dict(load_s=load_s, load_peak_rss_gib=load_rss, forward_s_incl_compile=forward_s,
                          peak_rss_gib=rss_gib())),
              open(os.path.join(args.work, "ours.json"), "w"))


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20


def run_watched(cmd: list[str], min_free_gib: float) -> tuple[float, float, str | None]:
    """Runs cmd; kills it if the machine runs short of memory. (seconds, lowest MemAvailable GiB, error)."""
    t, lowest = time.perf_counter(), mem_available_gib()
    proc = subprocess.Popen(cmd, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    while proc.poll() is None:
        time.sleep(0.5)
        lowest = min(lowest, mem_available_gib())
        if lowest < min_free_gib:
            proc.kill()
            proc.wait()
            return time.perf_counter() - t, lowest, f"killed: MemAvailable fell under {min_free_gib} GiB"
    error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
    return time.perf_counter() - t, lowest, error


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--layers", type=int, default=34, help="decoder layers (34: the real 4B)")
    ap.add_argument("--text-tokens", type=int, default=16, help="text tokens before and after the image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/official_4b", help="where the checkpoint is written (~9 GB bf16)")
    ap.add_argument("--official-python", default="/work/venv_gemma/bin/python")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--min-free-gib", type=float, default=1.5, help="kill a half below this MemAvailable")
    ap.add_argument("--official-half", choices=("init", "forward"), help=argparse.SUPPRESS)
    ap.add_argument("--our-half", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.official_half:
        return official_half(args)
    if args.our_half:
        return our_half(args)
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    common = ["--dtype", args.dtype, "--layers", str(args.layers), "--text-tokens", str(args.text_tokens),
              "--seed", str(args.seed), "--work", args.work]
    me = os.path.abspath(__file__)
    steps = {"official init + save": [args.official_python, me, "--official-half", "init", *common],
             "official forward": [args.official_python, me, "--official-half", "forward", *common],
             "ours": [sys.executable, me, "--our-half", *common]}
    walls = {}
    for name, cmd in steps.items():
        wall, lowest, error = run_watched(cmd, args.min_free_gib)
        walls[name] = dict(wall_s=round(wall, 1), lowest_mem_available_gib=round(lowest, 2))
        if error:
            print(json.dumps(dict(failed=name, error=error, **walls)))
            break
    else:
        result = json.load(open(os.path.join(args.work, "ours.json")))
        result["official"] = json.load(open(os.path.join(args.work, "official.json")))
        result["walls"] = walls
        result["loadavg"] = os.getloadavg()
        print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
