"""Real Gemma 3 270M (bundled GGUF, f32) against HF transformers on the same GGUF.

Fixtures: tests/reference/make_270m_fixtures.py (top-64 logits and logsumexp at
chosen positions, HF's 32 greedy tokens with their top-2 gaps). Tolerance
2e-3 on f32 logits (the issue's bound for the real model; tiny configs use 2e-4).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from conftest import FIXTURES

REF = json.loads((FIXTURES / "gemma3_270m" / "reference.json").read_text())
NPZ = dict(np.load(FIXTURES / "gemma3_270m" / "reference.npz"))
PROMPTS = list(enumerate(p["name"] for p in REF["prompts"]))
NEAR_TIE = 0.05
ATOL = 5e-4  # the issue asks 2e-3; measured worst 1.9e-4 (benchmarks/parity_270m.py)


def logits_at(model, ids, positions):
    """f32 logits [len(positions), V] of one plain forward over `ids`, projecting only `positions`."""
    hidden = model(jnp.asarray([ids]), return_hidden=True)[0]
    return np.asarray(model.embedder.decode(hidden[None, jnp.asarray(positions)])[0])


def test_config_matches_hf(model_270m):
    c, hf = model_270m.config, REF["hf_config_summary"]
    assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim, c.sliding_window,
            c.query_pre_attn_scalar) == (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"],
                                         hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"],
                                         hf["sliding_window"], hf["query_pre_attn_scalar"])
    assert list(c.layer_types) == ["global" if t == "full_attention" else "local" for t in hf["layer_types"]]
    assert c.rope_local_base == hf["rope_parameters"]["sliding_attention"]["rope_theta"]
    assert c.rope_global_base == hf["rope_parameters"]["full_attention"]["rope_theta"]


def test_prompts_cover_the_window():
    lengths = [len(NPZ[f"p{i}_ids"]) for i, _ in PROMPTS]
    assert len(lengths) >= 5 and max(lengths) > 1000


@pytest.mark.parametrize("i,name", PROMPTS)
def test_tokenizer_gives_hf_ids(tokenizer_270m, i, name):
    assert tokenizer_270m.encode(REF["prompts"][i]["text"]) == NPZ[f"p{i}_ids"].tolist()


@pytest.mark.parametrize("i,name", PROMPTS)
def test_prompt_logits_match_hf(model_270m, i, name):
    positions = NPZ[f"p{i}_positions"]
    ours = logits_at(model_270m, NPZ[f"p{i}_ids"].tolist(), positions)
    hf_values, hf_indices = NPZ[f"p{i}_top64_values"], NPZ[f"p{i}_top64_indices"]
    np.testing.assert_allclose(np.take_along_axis(ours, hf_indices, axis=1), hf_values, atol=ATOL, rtol=0)
    np.testing.assert_allclose(logsumexp(ours, axis=1), NPZ[f"p{i}_lse"], atol=ATOL, rtol=0)
    # Our own top-64 cannot hide a logit HF ranks lower: our 64th value is HF's 64th (within tolerance).
    np.testing.assert_allclose(np.sort(ours, axis=1)[:, -64], hf_values[:, -1], atol=ATOL)


@pytest.mark.parametrize("i,name", PROMPTS)
def test_greedy_continuation_teacher_forced(model_270m, i, name):
    """32 greedy steps: our argmax equals HF's token, except where HF's top-2 gap is a near-tie."""
    gen_len = REF["prompts"][i]["gen_len"]
    prompt, gen = NPZ[f"p{i}_ids"].tolist(), NPZ[f"p{i}_gen_ids"][:gen_len].tolist()
    steps = len(prompt) - 1 + np.arange(gen_len)
    ours = logits_at(model_270m, prompt + gen, steps)
    hf_values, hf_indices = NPZ[f"p{i}_tf_top16_values"][:gen_len], NPZ[f"p{i}_tf_top16_indices"][:gen_len]
    np.testing.assert_allclose(np.take_along_axis(ours, hf_indices, axis=1), hf_values, atol=ATOL, rtol=0)
    gaps = NPZ[f"p{i}_tf_top2_gap"][:gen_len]
    flips = [s for s in range(gen_len) if ours[s].argmax() != gen[s]]
    assert all(gaps[s] < NEAR_TIE for s in flips), f"argmax differs at steps {flips} with HF gaps {gaps[flips]}"
    assert len(flips) <= 2


def test_sampler_greedy_equals_hf(model_270m, tokenizer_270m):
    """gemma.Sampler greedy ids equal HF's generate ids; a divergence is allowed only at an HF near-tie."""
    import gemma

    sampler = gemma.Sampler(model_270m, tokenizer_270m, max_len=2048)
    short = [i for i, _ in PROMPTS if len(NPZ[f"p{i}_ids"]) < 512]
    long = [i for i, _ in PROMPTS if len(NPZ[f"p{i}_ids"]) >= 512]
    got = dict(zip(short, sampler.generate([NPZ[f"p{i}_ids"].tolist() for i in short], max_new_tokens=32).tokens))
    for i in long:
        got[i] = sampler.generate(NPZ[f"p{i}_ids"].tolist(), max_new_tokens=32).tokens
    assert len(got) >= 5 and long
    exact = 0
    for i, ours in got.items():
        hf = NPZ[f"p{i}_gen_ids"][: REF["prompts"][i]["gen_len"]].tolist()
        first = next((s for s, (a, b) in enumerate(zip(ours, hf)) if a != b), None)
        if first is None:
            assert ours == hf, f"prompt {i}: lengths differ"
            exact += 1
        else:
            gap = NPZ[f"p{i}_gen_top2_gap"][first]
            assert gap < NEAR_TIE, f"prompt {i}: first difference at step {first}, HF top-2 gap {gap:.3f}"
    assert exact >= len(got) - 2
