"""Exports for other tools: checkpoints.save_hf (HF transformers directories) and gemma.train.export
(PEFT LoRA adapters), checked against files and logits the peers made (tests/reference/make_tiny_fixtures.py,
make_peft_fixtures.py) and, with $GEMMA_REFERENCE_PYTHON set (torch, transformers, peft), loaded live by
transformers and peft (tests/reference/hf_export_logits.py)."""

import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import checkpoints
from checkpoints.params import hf_specs
from conftest import FIXTURES
from gemma import config as gemma_config
from gemma.config import GemmaConfig
from gemma.train import export, lora
from gemma.transformer import Transformer

TINY = FIXTURES / "tiny"
PEFT = FIXTURES / "peft"
REFERENCE_PYTHON = os.environ.get("GEMMA_REFERENCE_PYTHON")


def _leaves(model):
    return jax.tree.leaves(nnx.state(model))


def _randomize_adapters(model, seed=1, scale=0.05):
    state = nnx.state(model, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda x: scale * jax.random.normal(next(keys), x.shape), state))


def _hub_key(key):  # transformers 5 writes the tower without the Hub's vision_model. level
    return key.replace("vision_tower.vision_model.", "vision_tower.")


@pytest.mark.parametrize("name", ["window", "scaled", "mqa", "window_multimodal_v5"])
def test_save_hf_writes_what_transformers_saved(tmp_path, name):
    """Load an HF save_pretrained directory, export it: the same tensors bit for bit under the same names,
    a config that reads back to the same GemmaConfig, and a directory that loads back to the same model."""
    model = checkpoints.load(TINY / name)
    checkpoints.save_hf(model, tmp_path)
    theirs, ours = load_file(TINY / name / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    ours = {_hub_key(k): v for k, v in ours.items()}
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), key
    assert GemmaConfig.from_hf(str(tmp_path)) == GemmaConfig.from_hf(str(TINY / name))
    written = json.loads((tmp_path / "config.json").read_text())
    arch = "Gemma3ForConditionalGeneration" if "multimodal" in name else "Gemma3ForCausalLM"
    assert written["architectures"] == [arch]
    back = checkpoints.load(tmp_path)
    assert back.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(back), _leaves(model)))


@pytest.mark.parametrize("preset", sorted(gemma_config.PRESETS))
def test_hf_config_reads_back_to_every_preset(preset):
    from checkpoints.to_hf import hf_config

    c = gemma_config.preset(preset)
    assert GemmaConfig.from_hf(hf_config(c)) == c


def test_every_layout_inverse_undoes_the_import():
    c = gemma_config.tiny(num_kv_heads=1).replace(vision=gemma_config.SigLIPConfig(
        image_size=28, patch_size=14, width=32, depth=1, mlp_dim=48, num_heads=2, tokens_per_image=1))
    rng = np.random.default_rng(0)
    for key, spec in hf_specs(c).items():
        x = rng.standard_normal(spec.hf_shape).astype(np.float32)
        assert np.array_equal(np.asarray(spec.to_hf(spec.to_ours(x))), x), key


def test_save_hf_shards_past_the_limit_and_loads_back(tmp_path):
    model = checkpoints.load(TINY / "mqa")
    checkpoints.save_hf(model, tmp_path, max_shard_bytes=100_000, dtype=jnp.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 1 and sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == files
    assert index["metadata"]["total_size"] == sum(
        sum(v.nbytes for v in load_file(tmp_path / f).values()) for f in files)
    back = checkpoints.load(tmp_path, dtype=jnp.bfloat16)
    for a, b in zip(_leaves(back), _leaves(model)):
        assert a.dtype == jnp.bfloat16 and np.array_equal(a, jnp.asarray(b, jnp.bfloat16))


def test_save_hf_writes_adapters_merged_and_leaves_the_model_alone(tmp_path):
    model = Transformer(gemma_config.tiny(), rngs=nnx.Rngs(0))
    lora.apply(model, 4, 8.0, "q,k,v,o,gate,up,down")
    _randomize_adapters(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 11)), jnp.int32)
    adapted = model(tokens)
    checkpoints.save_hf(model, tmp_path)
    assert lora.settings(model) is not None  # still adapted
    merged = lora.merge(model)
    back = checkpoints.load(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(back), _leaves(merged)))
    np.testing.assert_allclose(back(tokens), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["all_targets", "qv_rank2"])
def test_a_peft_made_adapter_gives_peft_logits(tmp_path, case):
    """Adapters peft made on a tiny HF model: our logits with them equal PeftModel's (f32), and saving
    them again writes peft's file bit for bit."""
    io = np.load(PEFT / case / "io.npz")
    base = json.loads((PEFT / case / "versions.json").read_text())["base"]
    model = checkpoints.load(FIXTURES / base)
    ids = jnp.asarray(io["ids"])
    np.testing.assert_allclose(model(ids), io["base_logits"], atol=1e-4, rtol=0)
    export.load_peft(model, PEFT / case)
    theirs = json.loads((PEFT / case / "adapter_config.json").read_text())
    assert lora.settings(model) == {"rank": theirs["r"], "alpha": theirs["lora_alpha"],
                                    "targets": [t for t, m in export.HF_MODULES.items()
                                                if m.split(".")[-1] in theirs["target_modules"]]}
    logits = model(ids)
    assert float(np.abs(io["logits"] - io["base_logits"]).max()) > 1.0  # the adapter matters
    np.testing.assert_allclose(logits, io["logits"], atol=1e-4, rtol=0)

    export.save_peft(model, tmp_path)
    ours, peft_file = load_file(tmp_path / export.WEIGHTS_FILE), load_file(PEFT / case / export.WEIGHTS_FILE)
    assert sorted(ours) == sorted(peft_file)
    assert all(ours[k].dtype == peft_file[k].dtype and np.array_equal(ours[k], peft_file[k]) for k in ours)
    written = json.loads((tmp_path / export.CONFIG_FILE).read_text())
    assert (written["r"], written["lora_alpha"], sorted(written["target_modules"])) == \
        (theirs["r"], theirs["lora_alpha"], sorted(theirs["target_modules"]))


def test_peft_factors_compose_to_the_update_in_hf_layout():
    """(alpha / r) * B @ A of every saved pair equals our update mapped by the import table's inverse."""
    model = Transformer(gemma_config.tiny(num_kv_heads=1), rngs=nnx.Rngs(0))
    lora.apply(model, 3, 5.0, "q,k,v,o,gate,up,down")
    _randomize_adapters(model)
    tensors, specs = export.peft_tensors(model), hf_specs(model.config)
    for i, name, layer in export._adapters(model):
        key = f"layers.{i}.{export.HF_MODULES[name]}"
        a, b = tensors[f"base_model.model.model.{key}.lora_A.weight"], tensors[f"base_model.model.model.{key}.lora_B.weight"]
        expected = np.asarray(specs[key + ".weight"].to_hf(layer.delta()))
        np.testing.assert_allclose(layer.scale * b @ a, expected, atol=1e-6, rtol=1e-5)


def test_save_then_load_peft_is_bitwise(tmp_path):
    model = Transformer(gemma_config.tiny(), rngs=nnx.Rngs(0))
    lora.apply(model, 2, 4.0, "o,down")
    _randomize_adapters(model)
    export.save_peft(model, tmp_path, base_model="base")
    fresh = export.load_peft(Transformer(gemma_config.tiny(), rngs=nnx.Rngs(0)), tmp_path)
    assert lora.settings(fresh) == lora.settings(model)
    a, b = nnx.state(model, nnx.LoRAParam), nnx.state(fresh, nnx.LoRAParam)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _copy_adapter(tmp_path, case="qv_rank2", **config_changes):
    out = tmp_path / "adapter"
    shutil.copytree(PEFT / case, out)
    config = json.loads((out / export.CONFIG_FILE).read_text())
    config.update(config_changes)
    (out / export.CONFIG_FILE).write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "use_dora"), (dict(use_rslora=True), "use_rslora"), (dict(peft_type="IA3"), "peft_type"),
    (dict(layers_to_transform=[0]), "layers_to_transform"), (dict(r=3), "mis-shaped"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern")])
def test_load_peft_refuses_what_it_cannot_represent(tmp_path, changes, message):
    model = checkpoints.load(TINY / "mqa")
    with pytest.raises(ValueError, match=message):
        export.load_peft(model, _copy_adapter(tmp_path, **changes))
    assert lora.settings(model) is None  # nothing attached


def test_load_peft_names_missing_and_foreign_tensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export.load_peft(checkpoints.load(TINY / "mqa"), tmp_path)
    out = _copy_adapter(tmp_path)
    tensors = load_file(out / export.WEIGHTS_FILE)
    del tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = np.zeros((2, 4), np.float32)
    from safetensors.numpy import save_file
    save_file(tensors, out / export.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"(?s)1 unexpected.*rotary.*1 missing.*layers\.2\.self_attn\.v_proj\.lora_B"):
        export.load_peft(checkpoints.load(TINY / "mqa"), out)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export.save_peft(checkpoints.load(TINY / "mqa"), tmp_path / "none")
    with pytest.raises(ValueError, match="does not fit"):  # the 7-layer adapter on a 2-layer model
        short = GemmaConfig.from_hf(str(TINY / "mqa")).replace(num_layers=2, layer_types=None)
        export.load_peft(Transformer(short, rngs=nnx.Rngs(0)), _copy_adapter(tmp_path / "x"))


def _live(tmp_path, model, targets, text=None, tokenizer=None):
    """Exports base / merged / adapter of `model` (LoRA on `targets`, random factors), runs the peers."""
    ids = np.random.default_rng(0).integers(3, min(model.config.vocab_size, 262_144), (2, 24)).astype(np.int64)
    ids[:, 0] = 2
    np.save(tmp_path / "ids.npy", ids)
    checkpoints.save_hf(model, tmp_path / "base", tokenizer)
    base_logits = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    lora.apply(model, 4, 8.0, targets)
    _randomize_adapters(model, scale=0.02)
    logits = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    checkpoints.save_hf(model, tmp_path / "merged", tokenizer)
    export.save_peft(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    if text is not None:
        (tmp_path / "text.txt").write_text(text)
    subprocess.run([REFERENCE_PYTHON, os.path.join(os.path.dirname(__file__), "reference", "hf_export_logits.py"),
                    str(tmp_path)], check=True, timeout=900)
    peer, info = np.load(tmp_path / "peer.npz"), json.loads((tmp_path / "peer.json").read_text())
    return logits, base_logits, peer, info


@pytest.mark.skipif(not REFERENCE_PYTHON, reason="set GEMMA_REFERENCE_PYTHON to a python with torch, transformers "
                                                 "and peft to load the exports in the peers")
def test_exports_load_in_transformers_and_peft_tiny(tmp_path):
    logits, base_logits, peer, info = _live(tmp_path, Transformer(gemma_config.tiny(), rngs=nnx.Rngs(0)),
                                            "q,k,v,o,gate,up,down")
    assert info["merged_class"] == "Gemma3ForCausalLM" and info["peft_class"] == "PeftModelForCausalLM"
    assert np.abs(logits - base_logits).max() > 0.1
    np.testing.assert_allclose(peer["merged"], logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(peer["peft"], logits, atol=1e-4, rtol=0)


@pytest.mark.real
@pytest.mark.skipif(not REFERENCE_PYTHON, reason="set GEMMA_REFERENCE_PYTHON to a python with torch, transformers "
                                                 "and peft to load the exports in the peers")
def test_exports_of_the_real_270m_load_in_transformers_and_peft(tmp_path, tokenizer_270m):
    text = "<start_of_turn>user\nWrite one line about the sea.<end_of_turn>\n<start_of_turn>model\n 😀 日本 12345"
    model = checkpoints.load("gemma3-270m")
    logits, base_logits, peer, info = _live(tmp_path, model, "q,v,o,down", text, tokenizer_270m)
    scale = float(np.abs(logits).max())
    for name in ("merged", "peft"):
        err = float(np.abs(peer[name] - logits).max())
        print(f"270M {name}: max |HF - ours| {err:.2e} with logits up to {scale:.1f}")
        assert err <= 1e-4 * scale, name
    assert np.abs(logits - base_logits).max() > 0.1
    assert peer["token_ids"].tolist() == tokenizer_270m.encode(text, add_bos=True)
