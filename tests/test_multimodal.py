"""Multimodal Gemma 3 (SigLIP tower, projector, per-image bidirectional blocks) vs HF, tiny random model."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import checkpoints
from conftest import FIXTURES
from gemma.transformer import causal_intervals, image_block_end

MM = FIXTURES / "tiny" / "window_multimodal_v5"


@pytest.fixture(scope="module")
def mm():
    return checkpoints.load(MM), dict(np.load(MM / "io.npz"))


def nhwc(pixels_nchw):
    return jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))


def test_vision_features_match_hf(mm):
    model, io = mm
    np.testing.assert_allclose(model.vision(nhwc(io["mm_pixel_values"])), io["mm_image_features"], atol=1e-5)


def test_logits_with_images_match_hf(mm):
    model, io = mm
    assert np.abs(io["mm_logits"] - io["mm_logits_no_tti"]).max() > 1.0  # the bidirectional block matters here
    logits = model(jnp.asarray(io["mm_input_ids"]), images=nhwc(io["mm_pixel_values"]))
    np.testing.assert_allclose(logits, io["mm_logits"], atol=2e-4, rtol=0)


def test_image_blocks_are_intervals():
    soft = jnp.asarray([[0, 1, 1, 1, 0, 0, 1, 1, 0]], bool)
    assert image_block_end(soft).tolist() == [[-1, 3, 3, 3, -1, -1, 7, 7, -1]]
    k_start, k_end = causal_intervals(jnp.ones_like(soft), 2, image_block_end(soft))
    assert k_end.tolist() == [[0, 3, 3, 3, 4, 5, 7, 7, 8]]  # soft tokens see their whole block, not the next image
    assert k_start.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6, 7]]  # the window still bounds the past on local layers


def test_text_only_load_does_not_read_vision(mm, tmp_path, monkeypatch):
    import safetensors

    read = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *a):
            return self._f.__exit__(*a)

        def keys(self):
            return self._f.keys()

        def get_slice(self, key):
            return self._f.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr("checkpoints.from_hf.safe_open", Spy)
    text = checkpoints.load(MM, text_only=True)
    assert text.vision is None and text.config.vision is None
    assert read and not [k for k in read if "vision" in k or "multi_modal" in k]
    model, io = mm
    np.testing.assert_allclose(text(jnp.asarray(io["input_ids"])), io["logits"], atol=2e-4)
    with pytest.raises(ValueError, match="no vision tower"):
        text(jnp.asarray(io["mm_input_ids"]), images=nhwc(io["mm_pixel_values"]))


def test_hub_layout_with_vision_model_prefix(mm, tmp_path):
    from test_checkpoints import copy_with_keys

    d = copy_with_keys(MM, tmp_path / "hub", lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(d / "model.safetensors"))
    model, io = mm
    hub = checkpoints.load(d)
    np.testing.assert_array_equal(hub(jnp.asarray(io["mm_input_ids"]), images=nhwc(io["mm_pixel_values"])),
                                  model(jnp.asarray(io["mm_input_ids"]), images=nhwc(io["mm_pixel_values"])))


def test_orbax_round_trip_keeps_vision(mm, tmp_path):
    model, io = mm
    checkpoints.save(model, tmp_path / "ckpt")
    restored = checkpoints.load(tmp_path / "ckpt")
    assert restored.config == model.config and restored.vision is not None
    args = (jnp.asarray(io["mm_input_ids"]),)
    kw = dict(images=nhwc(io["mm_pixel_values"]))
    np.testing.assert_array_equal(restored(*args, **kw), model(*args, **kw))


def test_image_count_errors(mm):
    model, io = mm
    tokens, pixels = jnp.asarray(io["mm_input_ids"]), nhwc(io["mm_pixel_values"])
    with pytest.raises(ValueError, match="more images than placeholders or fewer"):
        model(tokens, images=pixels[:1])
    with pytest.raises(ValueError, match="more images than placeholders or fewer"):
        model(tokens, images=jnp.concatenate([pixels, pixels[:1]]))
    with pytest.raises(ValueError, match="no images were given"):
        model(tokens)
    with pytest.raises(ValueError, match=r"images must be float \[num_images, 56, 56, 3\]"):
        model(tokens, images=jnp.asarray(io["mm_pixel_values"]))  # NCHW instead of NHWC
    with pytest.raises(TypeError, match="preprocessed floats"):
        model(tokens, images=(pixels * 100).astype(jnp.uint8))
    # 8 soft tokens in all, but in runs of 1, 2, 4 and 1: no image block is whole
    split = tokens.at[0, 6].set(5).at[1, 12].set(io["image_token_id"])
    with pytest.raises(ValueError, match="contiguous run"):
        model(split, images=pixels)
