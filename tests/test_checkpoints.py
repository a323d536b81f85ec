"""Checkpoint loaders: HF safetensors layouts, GGUF, orbax round trip, and clear errors on bad files."""

import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import checkpoints
from checkpoints.from_gguf import hf_name
from conftest import FIXTURES
from gemma.transformer import Transformer

WINDOW = FIXTURES / "tiny" / "window"
MULTIMODAL = FIXTURES / "tiny" / "window_multimodal_v5"


def io(d=WINDOW):
    return dict(np.load(d / "io.npz"))


def params(model):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def copy_with_keys(src, dst, rename):
    """An HF dir like `src` whose safetensors keys are renamed by `rename(key)` (None drops the key)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items() if rename(k) is not None}, dst / "model.safetensors")
    return dst


# ------------------------------------------------------------------ HF layouts
def test_multimodal_v5_file_text_only(tmp_path):
    model = checkpoints.load(MULTIMODAL, text_only=True)
    np.testing.assert_allclose(model(jnp.asarray(io()["input_ids"])), io()["logits"], atol=2e-4)


@pytest.mark.parametrize("layout", ["hub", "v5_module_names"])
def test_multimodal_layouts(tmp_path, layout):
    def rename(key):
        if layout == "hub":  # vision_tower.X -> vision_tower.vision_model.X; text stays language_model.model.X
            return key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if key.startswith(old):
                return new + key[len(old):]
        return key

    d = copy_with_keys(MULTIMODAL, tmp_path / layout, rename)
    text = checkpoints.load(d, text_only=True)
    np.testing.assert_allclose(text(jnp.asarray(io()["input_ids"])), io()["logits"], atol=2e-4)
    mm, ref = checkpoints.load(d), io(MULTIMODAL)
    logits = mm(jnp.asarray(ref["mm_input_ids"]), images=jnp.asarray(ref["mm_pixel_values"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(logits, ref["mm_logits"], atol=2e-4)


def test_sharded_safetensors(tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(WINDOW / "config.json", d / "config.json")
    tensors = sorted(load_file(WINDOW / "model.safetensors").items())
    save_file(dict(tensors[::2]), d / "model-00001-of-00002.safetensors")
    save_file(dict(tensors[1::2]), d / "model-00002-of-00002.safetensors")
    np.testing.assert_allclose(checkpoints.load(d)(jnp.asarray(io()["input_ids"])), io()["logits"], atol=2e-4)


# ------------------------------------------------------------------ errors
def test_mismatched_checkpoint_names_every_problem(tmp_path):
    def rename(key):
        if key == "model.layers.0.mlp.up_proj.weight":
            return None  # missing
        if key == "model.layers.1.mlp.up_proj.weight":
            return "model.layers.1.mlp.upp_proj.weight"  # unexpected (and its proper name missing)
        return key

    d = copy_with_keys(WINDOW, tmp_path / "bad", rename)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((3, 48), np.float32)  # mis-shaped
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        checkpoints.load(d)
    msg = str(e.value)
    assert "2 missing tensor(s): layers.0.mlp.up_proj.weight; layers.1.mlp.up_proj.weight" in msg
    assert "1 unexpected tensor(s): layers.1.mlp.upp_proj.weight" in msg
    assert "layers.2.self_attn.k_proj.weight: expected (32, 48), found (3, 48)" in msg


def test_config_that_disagrees_with_the_weights(tmp_path):
    d = tmp_path / "more_layers"
    shutil.copytree(WINDOW, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 8
    cfg["layer_types"] = cfg["layer_types"] + ["sliding_attention"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"13 missing tensor\(s\): layers\.7\."):
        checkpoints.load(d)


def test_truncated_safetensors(tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(WINDOW, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        checkpoints.load(d)


def test_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        checkpoints.load(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        checkpoints.load(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="neither gemma_config.json"):
        checkpoints.load(tmp_path)
    with pytest.raises(ValueError, match="no weights are bundled"):
        checkpoints.load("gemma3-27b")


# ------------------------------------------------------------------ GGUF
def write_gguf(path, hf_dir, qtype=gguf.GGMLQuantizationType.F32):
    """A llama.cpp-style GGUF of an HF tiny model: matrices in `qtype`, norms F32 stored as 1 + w."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_uint32("gemma3.context_length", cfg["max_position_embeddings"])
    w.add_uint32("gemma3.embedding_length", cfg["hidden_size"])
    w.add_uint32("gemma3.block_count", cfg["num_hidden_layers"])
    w.add_uint32("gemma3.feed_forward_length", cfg["intermediate_size"])
    w.add_uint32("gemma3.attention.head_count", cfg["num_attention_heads"])
    w.add_uint32("gemma3.attention.head_count_kv", cfg["num_key_value_heads"])
    w.add_uint32("gemma3.attention.key_length", cfg["head_dim"])
    w.add_uint32("gemma3.attention.value_length", cfg["head_dim"])
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32("gemma3.rope.freq_base", cfg["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_uint32("gemma3.attention.sliding_window", cfg["sliding_window"])
    to_gguf = {hf_name(g): g for g in ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(cfg["num_hidden_layers"]) for n in (
            "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm", "attn_norm",
            "post_attention_norm", "ffn_norm", "post_ffw_norm", "ffn_gate", "ffn_up", "ffn_down")]}
    for key, value in sorted(load_file(hf_dir / "model.safetensors").items()):
        name = to_gguf[key.removeprefix("model.")]
        if value.ndim == 1:
            w.add_tensor(name, (value + 1.0).astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F32 or value.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            w.add_tensor(name, value.astype(np.float32))  # rows not a whole number of blocks: F32, as llama.cpp
        else:
            w.add_tensor(name, gguf.quants.quantize(value.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_f32_matches_hf(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", WINDOW)
    gguf_model, hf_model = checkpoints.load(path), checkpoints.load(WINDOW)
    assert gguf_model.config == hf_model.config.replace(max_context=gguf_model.config.max_context)
    a, b = params(gguf_model), params(hf_model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)  # norms: (1 + w) - 1 in f32
    np.testing.assert_allclose(gguf_model(jnp.asarray(io()["input_ids"])), io()["logits"], atol=2e-4)


def test_gguf_q8_0_dequantizes_exactly(tmp_path):
    q8 = gguf.GGMLQuantizationType.Q8_0
    model = checkpoints.load(write_gguf(tmp_path / "q8.gguf", WINDOW, q8))
    down = load_file(WINDOW / "model.safetensors")["model.layers.3.mlp.down_proj.weight"]
    expected = gguf.quants.dequantize(gguf.quants.quantize(down, q8), q8).T
    assert not np.array_equal(expected, down.T)  # quantization really happened
    np.testing.assert_array_equal(model.layers[3].mlp.down_proj.w[...], expected)


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", WINDOW)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        checkpoints.load(tmp_path / "cut.gguf")
    (tmp_path / "cut_header.gguf").write_bytes(data[:200])
    with pytest.raises(ValueError, match="truncated or corrupt header"):
        checkpoints.load(tmp_path / "cut_header.gguf")


# ------------------------------------------------------------------ orbax
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orbax_round_trip_is_bit_exact(tmp_path, dtype, tokenizer_270m):
    model = checkpoints.load(WINDOW, dtype=dtype)
    checkpoints.save(model, tmp_path / "ckpt", tokenizer=tokenizer_270m)
    restored = checkpoints.load(tmp_path / "ckpt", dtype=None)
    assert restored.config == model.config and restored.dtype == jnp.dtype(dtype)
    a, b = params(model), params(restored)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype
        np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32), err_msg=k)
    tokens = jnp.asarray(io()["input_ids"])
    np.testing.assert_array_equal(model(tokens), restored(tokens))
    assert checkpoints.load_tokenizer(tmp_path / "ckpt").encode("Hello world") == tokenizer_270m.encode("Hello world")


def test_orbax_restore_with_another_dtype(tmp_path):
    model = checkpoints.load(WINDOW)
    checkpoints.save(model, tmp_path / "ckpt")
    as_bf16 = checkpoints.load(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert as_bf16.layers[0].attn.q_proj.w[...].dtype == jnp.bfloat16
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        checkpoints.load_tokenizer(tmp_path / "ckpt")


def test_random_init_model_saves_too(tmp_path):
    from gemma import config as C

    model = Transformer(C.tiny(), rngs=nnx.Rngs(3))
    checkpoints.save(model, tmp_path / "r")
    tokens = jnp.asarray([[1, 2, 3]])
    np.testing.assert_array_equal(checkpoints.load(tmp_path / "r")(tokens), model(tokens))


def test_inference_imports_no_checkpoint_writer():
    """Loading and sampling need neither orbax nor tensorstore (~25 MB resident and ~0.25 s of import): a fresh
    interpreter that imports checkpoints and the sampler holds none of their modules."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys\nimport checkpoints\nfrom gemma.sampler import Sampler\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'tensorstore'))))")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []
