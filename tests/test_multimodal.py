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


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu", "splash", "cudnn"])
def test_logits_with_images_match_hf_through_every_impl(mm, impl):
    """Image blocks (lookahead past the row) through each kernel; splash and cudnn cannot express them
    and hand them to their platform's flash kernel."""
    model, io = mm
    logits = model.with_attention_impl(impl)(jnp.asarray(io["mm_input_ids"]), images=nhwc(io["mm_pixel_values"]))
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


# ------------------------------------------------------------------ two images, cached decode (HF fixture)
TWO = dict(np.load(FIXTURES / "multimodal" / "two_images.npz"))


def test_two_images_in_one_prompt(mm):
    model, _ = mm
    pixels = nhwc(TWO["pixel_values"])
    np.testing.assert_allclose(model.vision(pixels), TWO["image_features"], atol=1e-5)
    assert np.abs(TWO["logits"] - TWO["logits_causal"]).max() > 1.0
    np.testing.assert_allclose(model(jnp.asarray(TWO["input_ids"]), images=pixels), TWO["logits"], atol=2e-4)


def test_cached_prefill_with_images_then_decode(mm, tokenizer_270m):
    from gemma.sampler import Sampler

    model, _ = mm
    sampler = Sampler(model, tokenizer_270m, max_len=64, prefill_chunk=8)  # chunk < prompt: images force one chunk
    ids = TWO["input_ids"].tolist()
    logits, cache = sampler.prefill(ids, sampler.new_cache(2, 64), np.asarray(nhwc(TWO["pixel_values"])))
    np.testing.assert_allclose(logits, TWO["logits"][:, -1], atol=2e-4)
    for step in range(TWO["decode_tokens"].shape[1]):
        logits, cache = sampler.prefill(TWO["decode_tokens"][:, step:step + 1].tolist(), cache)
        np.testing.assert_allclose(logits, TWO["decode_logits"][:, step], atol=2e-4)


def test_sampler_expands_image_markers(mm, tokenizer_270m):
    from gemma.sampler import Sampler

    model, _ = mm
    sampler = Sampler(model, tokenizer_270m, max_len=64)
    image = (np.arange(56 * 56 * 3) % 251).astype(np.uint8).reshape(56, 56, 3)
    ids, pixels = sampler.prepare([2, 17, model.config.boi_token_id, 9], [image])
    newline = tokenizer_270m.encode("\n\n", add_bos=False)
    assert ids == [2, 17, *newline, 253, 255, 255, 255, 255, 254, *newline, 9]
    assert pixels.shape == (1, 56, 56, 3)
    mixed, mixed_pixels = sampler.prepare(["", image], add_bos=True)
    assert mixed == [2, *newline, 253, 255, 255, 255, 255, 254, *newline]
    np.testing.assert_array_equal(mixed_pixels, pixels)
    with pytest.raises(ValueError, match="1 <start_of_image> marker"):
        sampler.prepare([2, 17, 253, 9], [image, image])
    out = sampler.generate([2, 17, 253, 9], images=[image], max_new_tokens=3)
    assert len(out.tokens) == 3


# ------------------------------------------------------------------ preprocessing and Pan & Scan (HF fixtures)
import json  # noqa: E402

import vision  # noqa: E402

PRE = dict(np.load(FIXTURES / "multimodal" / "preprocess.npz"))
IMAGES = FIXTURES / "multimodal" / "images"


@pytest.mark.parametrize("name", sorted(PRE))
def test_preprocess_matches_hf(name):
    ours = vision.preprocess(IMAGES / name, image_size=56)
    assert ours.dtype == np.float32 and ours.shape == (56, 56, 3)
    np.testing.assert_allclose(ours, PRE[name].transpose(1, 2, 0), atol=2 / 255 + 1e-6)  # one uint8 step of [-1, 1]


def test_preprocess_inputs(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    from_array = vision.preprocess(rgb, 28)
    assert from_array.min() >= -1 and from_array.max() <= 1
    np.testing.assert_array_equal(from_array, vision.preprocess(Image.fromarray(rgb), 28))
    assert vision.preprocess(np.zeros((1, 1, 3), np.uint8), 28).shape == (28, 28, 3)  # 1x1 is resized, not an error
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    np.testing.assert_allclose(vision.preprocess(sixteen, 14), 1.0)  # 16-bit white stays white
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    path.with_name("cut.png").write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot read image"):
        vision.preprocess(path.with_name("cut.png"))
    path.with_name("junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        vision.preprocess(path.with_name("junk.png"))
    with pytest.raises(TypeError, match="uint8"):
        vision.preprocess(rgb.astype(np.float32))


def test_pan_and_scan_matches_hf():
    ref = json.loads((FIXTURES / "multimodal" / "pan_and_scan.json").read_text())
    assert ref["original_image_first"]
    for case in ref["cases"]:
        w, h = case["width"], case["height"]
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = (np.arange(w) % 256)[None, :]
        image[..., 1] = (np.arange(h) % 256)[:, None]
        image[..., 2] = ((np.arange(w)[None, :] // 256 + 16 * (np.arange(h)[:, None] // 256)) % 256)
        crops = vision.pan_and_scan(image)
        assert len(crops) == case["num_crops"], (w, h)
        for crop, (x0, y0, x1, y1) in zip(crops, case["boxes_x0_y0_x1_y1"]):
            np.testing.assert_array_equal(np.asarray(crop), image[y0:y1, x0:x1])


def test_chat_turn_with_an_image(mm, tokenizer_270m):
    from gemma.chat import ChatSampler

    model, _ = mm
    image = (np.arange(30 * 20 * 3) % 256).astype(np.uint8).reshape(30, 20, 3)
    chat = ChatSampler(model, tokenizer_270m, max_len=96)
    chat.send(["Look:", image], max_new_tokens=3)
    c = model.config
    assert chat.tokens.count(c.image_token_id) == c.vision.tokens_per_image
    assert int(chat.cache.length[0]) == len(chat.tokens) and chat.history[0]["text"] == "Look:<start_of_image>"
    # the kept cache (image prefilled in turn 1) equals a fresh prefill of the dialog with the same image
    s = chat.sampler
    kept, _ = s.prefill([[9]], chat.cache)
    fresh, _ = s.prefill([chat.tokens + [9]], s.new_cache(1, 96), vision.preprocess(image, 56)[None])
    np.testing.assert_allclose(kept, fresh, atol=2e-4, rtol=0)
