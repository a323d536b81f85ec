"""Config presets (zero-memory parameter counts through jax.eval_shape) and HF config import."""

import jax
import pytest
from flax import nnx

from gemma import config as C
from gemma.transformer import Transformer


def param_count(cfg: C.GemmaConfig) -> int:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def text_params(v, layers, d, n, k, h, f):
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 4 * d + 2 * h
    return v * d + layers * per_layer + d


def siglip_params(d_model, width=1152, depth=27, mlp=4304, patch=14, patches=4096):
    block = 4 * (width * width + width) + 4 * width + 2 * width * mlp + mlp + width
    tower = patch * patch * 3 * width + width + patches * width + depth * block + 2 * width
    return tower + width + width * d_model  # + projector norm and projection


@pytest.mark.parametrize("name,expected", [
    ("gemma3-270m", 268_098_176),
    ("gemma3-1b", 999_885_952),
    ("gemma3-4b", 4_300_079_472),  # the released gemma-3-4b's count, vision tower included
    ("gemma3-4b", text_params(262_208, 34, 2560, 8, 4, 256, 10240) + siglip_params(2560)),
    ("gemma3-12b", text_params(262_208, 48, 3840, 16, 8, 256, 15360) + siglip_params(3840)),
    ("gemma3-27b", text_params(262_208, 62, 5376, 32, 16, 128, 21504) + siglip_params(5376)),
])
def test_preset_parameter_counts(name, expected):
    assert param_count(C.preset(name)) == expected


@pytest.mark.parametrize("name,layers,n_global,d,heads,kv,hd,window,qscale,hidden", [
    ("gemma3-270m", 18, 3, 640, 4, 1, 256, 512, 256, 2048),
    ("gemma3-1b", 26, 4, 1152, 4, 1, 256, 512, 256, 6912),
    ("gemma3-4b", 34, 5, 2560, 8, 4, 256, 1024, 256, 10240),
    ("gemma3-12b", 48, 8, 3840, 16, 8, 256, 1024, 256, 15360),
    ("gemma3-27b", 62, 10, 5376, 32, 16, 128, 1024, 168, 21504),
])
def test_preset_figures(name, layers, n_global, d, heads, kv, hd, window, qscale, hidden):
    c = C.preset(name)
    assert (c.num_layers, c.num_global_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
            c.sliding_window, c.query_pre_attn_scalar, c.hidden_dim) == (
        layers, n_global, d, heads, kv, hd, window, qscale, hidden)
    assert [i for i, t in enumerate(c.layer_types) if t == "global"] == [i for i in range(layers) if (i + 1) % 6 == 0]
    assert (c.rope_local_base, c.rope_global_base) == (10_000, 1_000_000)
    assert c.rope_global_scale == (1.0 if name in ("gemma3-270m", "gemma3-1b") else 8.0)
    assert c.final_logit_softcap is None and c.attn_logit_softcap is None


HUB_4B_TEXT = {  # google/gemma-3-4b-it text_config, Hub (transformers 4.x) spelling
    "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024, "sliding_window_pattern": 6, "rms_norm_eps": 1e-6,
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "max_position_embeddings": 131072,
}


def test_from_hf_hub_style_multimodal():
    c = C.GemmaConfig.from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": HUB_4B_TEXT})
    assert c == C.gemma3_4b().text_only()  # vocab_size defaults to the 262208 rows of multimodal checkpoints


def test_from_hf_v5_style():
    v5 = {k: v for k, v in HUB_4B_TEXT.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                             "sliding_window_pattern")}
    v5.update(vocab_size=262208, layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                              for i in range(34)],
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert C.GemmaConfig.from_hf(v5) == C.gemma3_4b().text_only()


def test_from_hf_fixture_files():
    from conftest import FIXTURES

    scaled = C.GemmaConfig.from_hf(FIXTURES / "tiny" / "scaled")
    assert (scaled.query_pre_attn_scalar, scaled.head_dim, scaled.rope_global_scale) == (24, 32, 8.0)
    mm = C.GemmaConfig.from_hf(FIXTURES / "tiny" / "window_multimodal_v5")
    assert mm.text_only().replace(image_token_id=262144, boi_token_id=255999, eoi_token_id=256000) == \
        C.GemmaConfig.from_hf(FIXTURES / "tiny" / "window")
    assert (mm.vision.image_size, mm.vision.patch_size, mm.vision.width, mm.vision.tokens_per_image) == (56, 14, 32, 4)
    assert (mm.image_token_id, mm.boi_token_id, mm.eoi_token_id) == (255, 253, 254)


def test_bad_configs():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        C.tiny(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        C.tiny(layer_types=("local", "global"))
    with pytest.raises(ValueError, match="unknown preset"):
        C.preset("gemma3-3b")
    with pytest.raises(ValueError, match="'linear'"):
        C.GemmaConfig.from_hf({**HUB_4B_TEXT, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 8}})
    with pytest.raises(ValueError, match="lacks"):
        C.GemmaConfig.from_hf({"hidden_size": 4})


def test_a_config_is_data():
    """Importing the config (and building, checking and serialising one) loads no jax, flax, kernels or SigLIP
    code: a fresh interpreter that does it holds none of those modules afterwards (numpy and PIL may load, for
    the vision package's preprocessing)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys\nfrom gemma.config import GemmaConfig\nimport gemma.config as C\n"
            "c = C.gemma3_1b()\nassert GemmaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax') or m in ('kernels.reference', 'vision.siglip'))))")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []
