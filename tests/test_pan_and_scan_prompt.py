"""Pan & Scan in Sampler / ChatSampler prompts: token ids equal HF Gemma3Processor's
(tests/reference/make_pan_and_scan_prompt_fixture.py), pixels are the full image then its crops."""

import json

import numpy as np
import pytest
from flax import nnx

import vision
from conftest import FIXTURES
from gemma.chat import ChatSampler
from gemma.config import MULTIMODAL_VOCAB_SIZE, tiny
from gemma.sampler import Sampler
from gemma.transformer import Transformer

REF = json.loads((FIXTURES / "multimodal" / "pan_and_scan_prompt.json").read_text())


@pytest.fixture(scope="module")
def sampler(tokenizer_270m):
    """Real Gemma 3 ids and 256 soft tokens per image; prepare never runs the model (abstract params)."""
    config = tiny(vocab_size=MULTIMODAL_VOCAB_SIZE, vision=vision.SigLIPConfig(
        image_size=224, patch_size=14, width=16, depth=1, mlp_dim=16, num_heads=2, tokens_per_image=256))
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return Sampler(model, tokenizer_270m, max_len=4096)


def image_of(width, height):
    rng = np.random.default_rng(width * 7 + height)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("case", REF["cases"], ids=lambda c: "+".join(f"{w}x{h}" for w, h in c["sizes_wh"]))
def test_prompt_ids_match_hf_processor(sampler, case):
    images = [image_of(w, h) for w, h in case["sizes_wh"]]
    ids, pixels = sampler.prepare(case["text"], images, pan_and_scan=True)
    assert ids == case["input_ids"]
    assert ids.count(262_144) == case["token_type_ids_sum"] == 256 * (len(images) + sum(case["num_crops"]))
    # pixels: each image, then its crops, in order of appearance
    expected = []
    for image, n in zip(images, case["num_crops"]):
        crops = vision.pan_and_scan(image)
        assert len(crops) == n
        expected += [vision.preprocess(x, 224) for x in [image, *crops]]
    np.testing.assert_array_equal(pixels, np.stack(expected))
    # the same prompt as a list mixing text and images gives the same ids
    parts = case["text"].split("<start_of_image>")
    mixed = [parts[0]] + sum(([im, text] for im, text in zip(images, parts[1:])), [])
    assert sampler.prepare(mixed, pan_and_scan=True)[0] == ids
    # off by default: one block per image, no crops
    plain, plain_pixels = sampler.prepare(case["text"], images)
    assert plain.count(262_144) == 256 * len(images) and len(plain_pixels) == len(images)


def test_pan_and_scan_edge_cases(sampler):
    square = image_of(300, 300)
    ids = [2, 17, 255_999, 9]
    assert sampler.prepare(ids, [square], pan_and_scan=True)[0] == sampler.prepare(ids, [square])[0]  # no crop
    wide = image_of(900, 300)
    ids_ps, pixels = sampler.prepare(ids, [wide], pan_and_scan=True)
    assert ids_ps[:2] == [2, 17] and ids_ps[-1] == 9 and len(pixels) == 4 and ids_ps.count(255_999) == 4
    assert sampler.prepare("no image here", pan_and_scan=True) == sampler.prepare("no image here")
    with pytest.raises(ValueError, match="1 <start_of_image> marker"):
        sampler.prepare("a<start_of_image>b", [wide, wide], pan_and_scan=True)
    with pytest.raises(ValueError, match="not both"):
        sampler.prepare(["a", wide], [wide], pan_and_scan=True)


class Stop(Exception):
    pass


def test_pan_and_scan_is_passed_through(sampler, monkeypatch):
    seen = []

    def prepare(self, prompt, images=None, add_bos=True, pan_and_scan=False):
        seen.append(pan_and_scan)
        raise Stop

    monkeypatch.setattr(Sampler, "prepare", prepare)
    wide = image_of(900, 300)
    calls = [lambda: sampler.generate("<start_of_image>", images=[wide], pan_and_scan=True),
             lambda: next(sampler.stream("<start_of_image>", images=[wide], pan_and_scan=True)),
             lambda: ChatSampler(sampler.model, sampler.tokenizer, max_len=64).send(["x", wide], pan_and_scan=True),
             lambda: next(ChatSampler(sampler.model, sampler.tokenizer, max_len=64).stream(["x", wide],
                                                                                           pan_and_scan=True)),
             lambda: sampler.generate("<start_of_image>", images=[wide])]
    for call in calls:
        with pytest.raises(Stop):
            call()
    assert seen == [True, True, True, True, False]
