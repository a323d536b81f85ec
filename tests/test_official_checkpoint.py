"""Official `gemma` package checkpoints: a tiny multimodal Gemma 3 written by the official package
(tests/reference/make_official_fixtures.py), loaded by checkpoints.load, vs the official forward (f32)."""

import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoints
import vision
from checkpoints import from_official
from conftest import FIXTURES

OFFICIAL = FIXTURES / "official_tiny"
CKPT = OFFICIAL / "ckpt"
IO = dict(np.load(OFFICIAL / "io.npz"))


@pytest.fixture(scope="module")
def model():
    return checkpoints.load(CKPT)


def pixels():
    return jnp.asarray(vision.preprocess(IO["image_u8"], image_size=448)[None])


def hidden_and_logits(model, tokens, images=None, rows=None, cols=None):
    hidden = np.asarray(model(jnp.asarray(tokens)[None], images=images, return_hidden=True)[0])
    logits = np.asarray(model.embedder.decode(jnp.asarray(hidden[rows])[None])[0])[:, cols]
    return hidden, logits


def test_detected_and_config_inferred(model):
    assert checkpoints.resolve(CKPT) == ("official", str(CKPT))
    c = model.config
    assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim) == (7, 8, 4, 2, 6, 24)
    assert c.layer_types == ("local",) * 5 + ("global", "local")
    # not in the tree: the Gemma 3 multimodal family rules
    assert (c.sliding_window, c.rope_global_scale, c.query_pre_attn_scalar) == (1024, 8.0, 6.0)
    v = c.vision
    assert (v.image_size, v.patch_size, v.width, v.depth, v.mlp_dim, v.num_heads, v.tokens_per_image) == (
        448, 14, 16, 2, 40, 2, 256)
    assert c.vocab_size == 262_208  # 262144 official rows + zero rows up to the soft-token id
    np.testing.assert_array_equal(model.embedder.embedding[262_144:], 0)


def test_image_prompt_matches_official_forward(model, tokenizer_270m):
    from gemma.sampler import Sampler

    c = model.config
    # our prompt expansion equals the official one (-2 is the official soft-token placeholder)
    ids, px = Sampler(model, tokenizer_270m, max_len=2048).prepare(IO["mm_tokens"].tolist(), [IO["image_u8"]])
    official = np.where(IO["mm_tokens_with_mm"] == -2, c.image_token_id, IO["mm_tokens_with_mm"])
    assert ids == official.tolist() and len(ids) > c.sliding_window  # the window is exercised
    np.testing.assert_allclose(px, pixels(), atol=1e-6)
    np.testing.assert_allclose(model.vision(pixels())[0], IO["soft_embeddings"], atol=2e-5)
    hidden, logits = hidden_and_logits(model, official, pixels(), IO["mm_text_index"][IO["mm_logit_rows"]],
                                       IO["mm_logit_cols"])
    np.testing.assert_allclose(hidden[IO["mm_text_index"]], IO["mm_hidden"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(logits, IO["mm_logits"], atol=2e-4, rtol=0)
    assert np.abs(IO["mm_logits"]).max() > 5  # not a near-zero model


def test_text_only_load_reads_no_vision_tensor(model, monkeypatch):
    read = []
    real = from_official.restore_arrays

    def spy(path, disk_paths):
        read.extend(disk_paths)
        return real(path, disk_paths)

    monkeypatch.setattr(from_official, "restore_arrays", spy)
    text = checkpoints.load(CKPT, text_only=True)
    assert text.vision is None and text.config.vision is None and text.config.vocab_size == 262_144
    assert read and not [k for k in read if from_official.is_vision_key(k)]
    hidden, logits = hidden_and_logits(text, IO["text_tokens"], rows=IO["text_logit_rows"],
                                       cols=IO["text_logit_cols"])
    np.testing.assert_allclose(hidden, IO["text_hidden"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(logits, IO["text_logits"], atol=2e-4, rtol=0)
    # the preset fixes what the tree cannot tell: the 1B's RoPE (no global scaling) changes the outputs
    other = checkpoints.load(CKPT, text_only=True, preset="gemma3-1b")
    assert other.config.rope_global_scale == 1.0 and other.config.sliding_window == 512
    assert np.abs(hidden_and_logits(other, IO["text_tokens"], rows=[0], cols=[0])[0] - hidden).max() > 1e-2


def save_tree(path, tree):
    """What gm.ckpts.save_params does: a StandardCheckpointer save of the tree."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def read_flat_tree():
    """The fixture's tree as stored ('transformer/...': {'w': array}), numpy leaves."""
    _, keys = from_official.canonical_keys(from_official.read_tree(str(CKPT)), "fixture")
    arrays = from_official.restore_arrays(str(CKPT), {key: disk for key, (disk, _, _) in keys.items()})
    tree = {}
    for key, (disk, _, _) in keys.items():
        from_official._set(tree, disk, arrays[key])
    return tree


def test_nested_layout_of_save_params(model, tmp_path):
    """gm.ckpts.save_params(model.init(...)['params']) writes the nested tree (listed by the reference
    script from the official package): rebuilt here from the released-layout fixture, then loaded."""
    flat = read_flat_tree()
    layout, keys = from_official.canonical_keys(flat, "fixture")
    assert layout == "released"
    expected = json.loads((OFFICIAL / "nested_keys.json").read_text())
    assert {k: [list(s), str(d)] for k, (_, s, d) in keys.items()} == expected
    nested = {}
    for key, (disk, _, _) in keys.items():
        from_official._set(nested, tuple(key.split("/")), from_official._get(flat, disk))
    save_tree(tmp_path / "nested", nested)
    loaded = checkpoints.load(tmp_path / "nested")
    assert loaded.config == model.config
    np.testing.assert_allclose(loaded.vision(pixels())[0], IO["soft_embeddings"], atol=2e-5)
    hidden = np.asarray(loaded(jnp.asarray(IO["text_tokens"])[None], return_hidden=True)[0])
    np.testing.assert_allclose(hidden, IO["text_hidden"], atol=2e-4, rtol=0)


# orbax's async reader may report "Event loop is closed" after a failed restore: noise, not our error
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bad_checkpoints_error_clearly(tmp_path):
    # truncated data file
    cut = tmp_path / "cut"
    shutil.copytree(CKPT, cut)
    big = max(glob.glob(str(cut / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    data = open(big, "rb").read()
    open(big, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged checkpoint"):
        checkpoints.load(cut)
    # missing metadata
    shutil.rmtree(cut)
    shutil.copytree(CKPT, cut)
    os.remove(cut / "_METADATA")
    with pytest.raises(ValueError, match="cannot read the orbax checkpoint metadata|no parameter tree"):
        checkpoints.load(cut)
    # one tensor missing, one unknown, one mis-shaped: all named in one error
    flat = read_flat_tree()
    del flat["transformer/layer_3/attn/_key_norm"]
    flat["transformer/layer_2/attn/extra"] = {"w": np.ones((2, 2), np.float32)}
    flat["transformer/layer_1/mlp/linear"]["w"] = np.ones((25, 8), np.float32)
    save_tree(tmp_path / "bad", flat)
    with pytest.raises(ValueError) as err:
        checkpoints.load(tmp_path / "bad")
    text = str(err.value)
    assert "1 missing tensor(s): layer_3/attn/_key_norm/scale" in text
    assert "1 unexpected tensor(s): layer_2/attn/extra/w" in text
    assert "layer_1/mlp/linear: expected (24, 8), found (25, 8)" in text
    # not a Gemma tree at all, and our own params/ folder passed instead of its parent
    save_tree(tmp_path / "other", {"foo": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="not an official Gemma checkpoint"):
        checkpoints.load(tmp_path / "other")
    save_tree(tmp_path / "ours", {"layers": {"0": np.ones(3, np.float32)}, "final_norm": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="pass its parent directory"):
        checkpoints.load(tmp_path / "ours")
    with pytest.raises(ValueError, match="preset= applies to official"):
        checkpoints.load(FIXTURES / "tiny" / "window", preset="gemma3-1b")
