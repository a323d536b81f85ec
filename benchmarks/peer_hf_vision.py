"""HF transformers peer for benchmarks/vision_encode.py: SigLIP So400m encode and a 2-layer 4B-layout prefill
with one image, random weights, f32, torch CPU.

Run with the reference venv (torch CPU, transformers 5.x):
    /work/venv311/bin/python benchmarks/peer_hf_vision.py --threads 2 --prompt-text 24
Prints one JSON line: encode_s (best of --repeats after a warm-up), prefill_s, shapes, peak RSS.
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
from transformers import Gemma3Config, Gemma3ForConditionalGeneration  # noqa: E402


def config() -> Gemma3Config:
    """Gemma 3 4B's text layout with 2 layers (1 local, 1 global) and the full SigLIP So400m/14 at 896 px."""
    text = dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
                layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=256,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                max_position_embeddings=131_072, hidden_activation="gelu_pytorch_tanh")
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=896, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                  vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, image_token_index=262_144,
                        boi_token_index=255_999, eoi_token_index=256_000)


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-text", type=int, default=24, help="text tokens before and after the image block")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = Gemma3ForConditionalGeneration._from_config(config(), attn_implementation="sdpa",
                                                         dtype=torch.float32).eval()
    build_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand((1, 3, 896, 896), generator=gen) * 2 - 1
    n = args.prompt_text
    text = torch.randint(3, 20000, (2 * n,), generator=gen).tolist()
    ids = [2] + text[:n] + [108, 255_999] + [262_144] * 256 + [256_000, 108] + text[n:]
    input_ids = torch.tensor([ids])
    token_type_ids = (input_ids == 262_144).long()
    with torch.no_grad():
        encode_s, encode_all = best_of(lambda: model.model.get_image_features(pixels), args.repeats)
        prefill_s, prefill_all = best_of(lambda: model(input_ids=input_ids, pixel_values=pixels,
                                                       token_type_ids=token_type_ids, logits_to_keep=1,
                                                       use_cache=True), args.repeats)
    print(json.dumps(dict(peer="hf_transformers", transformers=transformers.__version__, torch=torch.__version__,
                          threads=args.threads, dtype=str(model.dtype),
                          attn=model.config._attn_implementation, build_s=round(build_s, 1),
                          prompt_len=len(ids), encode_s=encode_s, encode_s_all=encode_all, prefill_s=prefill_s,
                          prefill_s_all=prefill_all,
                          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                          loadavg=os.getloadavg())))


if __name__ == "__main__":
    main()
