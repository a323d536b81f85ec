"""Multimodal parity fixtures from the peer implementation (HF transformers, torch, PIL; f32).

Run from the repository root (needs torch + transformers 5.x + pillow; the test suite does not):

    /work/venv311/bin/python tests/reference/make_multimodal_fixtures.py

Deterministic (fixed numpy / torch seeds). Writes under tests/fixtures/multimodal/:

  two_images.npz   (np.savez_compressed; load with np.load(..., allow_pickle=False))
      Model: tests/fixtures/tiny/window_multimodal_v5 (Gemma3ForConditionalGeneration, eager, f32;
      V=256, d_model=48, sliding window 8, image 255 / boi 253 / eoi 254, 4 tokens per image,
      SigLIP image_size 56). B=2 rows of the same length T (no padding):
        row 0: two images (boi + 4 x image + eoi each) with text between and after;
        row 1: one image near the start, then > 8 text tokens (longer than the sliding window).
      input_ids       int32 [2, T]
      token_type_ids  int32 [2, T]          1 exactly at image-token (255) positions, else 0
      pixel_values    f32   [3, 3, 56, 56]  NCHW, values k/127.5 - 1 (k uint8): in [-1, 1];
                                            order of appearance: row0 img0, row0 img1, row1 img0
      image_features  f32   [3, 4, 48]      model.model.get_image_features(pixel_values).pooler_output
      logits          f32   [2, T, 256]     model(input_ids, pixel_values, token_type_ids).logits
      logits_causal   f32   [2, T, 256]     same forward without token_type_ids (causal image tokens)
      decode_tokens   int32 [2, 4]          text ids fed one at a time after the prompt
      decode_logits   f32   [2, 4, 256]     logits of each fed token: prefill (with token_type_ids,
                                            use_cache=True, DynamicCache) then 4 single-token steps
                                            with the cache (no token_type_ids, as HF generate does)
      image_token_id, boi_token_id, eoi_token_id, sliding_window   int32 scalars
    The script checks decode_logits against a full no-cache forward of prompt + decode tokens
    (token_type_ids extended with zeros) and the prefill's last logits against `logits`.

  images/*.png|jpg   small deterministic test images (RGB, RGBA, L, P with a transparent palette
                     index, CMYK JPEG)
  preprocess.npz     key = image file name -> f32 [3, 56, 56]: HF Gemma3ImageProcessorPil output
                     (gemma-3 settings but size 56x56) for that file opened with PIL.Image.open
  preprocess.json    exact processor class/settings, per-file mode/size, RGB conversion notes

  pan_and_scan.json  HF pan & scan crop count + crop boxes (x0, y0, x1, y1) for a set of image
                     sizes, whether the original image comes first, and the exact
                     Gemma3Processor prompt format for pan & scan.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The repo's top-level `kernels` package shadows the `kernels` (HF hub kernels) package that
# transformers probes at import: keep the repo root off sys.path while this script runs.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers import Gemma3ForConditionalGeneration
from transformers.models.gemma3 import processing_gemma3
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

torch.set_num_threads(2)

OUT = ROOT / "tests" / "fixtures" / "multimodal"
IMG_DIR = OUT / "images"
MODEL_DIR = ROOT / "tests" / "fixtures" / "tiny" / "window_multimodal_v5"

IMAGE, BOI, EOI = 255, 253, 254
N_IMG_TOK = 4
N_DECODE = 4


# --------------------------------------------------------------------------------------------
# 1. two_images.npz
# --------------------------------------------------------------------------------------------

def image_block() -> list[int]:
    return [BOI] + [IMAGE] * N_IMG_TOK + [EOI]


def build_rows(rng: np.random.Generator) -> np.ndarray:
    def text(n: int) -> list[int]:
        return rng.integers(3, 250, size=n).tolist()

    # row 0: 2 text | img0 (pos 2..7) | 3 text | img1 (pos 11..16) | 13 text   -> T = 30
    row0 = text(2) + image_block() + text(3) + image_block() + text(13)
    # row 1: 3 text | img (pos 3..8) | 21 text  -> last text is 26 tokens after the image start
    row1 = text(3) + image_block() + text(21)
    assert len(row0) == len(row1) == 30, (len(row0), len(row1))
    return np.array([row0, row1], dtype=np.int32)


def make_two_images() -> dict:
    rng = np.random.default_rng(20250301)
    input_ids = build_rows(rng)
    token_type_ids = (input_ids == IMAGE).astype(np.int32)
    pix_u8 = rng.integers(0, 256, size=(3, 3, 56, 56), dtype=np.uint8)
    pixel_values = (pix_u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)
    decode_tokens = rng.integers(3, 250, size=(2, N_DECODE)).astype(np.int32)

    model = Gemma3ForConditionalGeneration.from_pretrained(
        MODEL_DIR, attn_implementation="eager", dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.image_token_id, cfg.boi_token_index, cfg.eoi_token_index, cfg.mm_tokens_per_image) == (
        IMAGE, BOI, EOI, N_IMG_TOK)
    W = cfg.text_config.sliding_window

    ids = torch.from_numpy(input_ids).long()
    tti = torch.from_numpy(token_type_ids).long()
    pix = torch.from_numpy(pixel_values)
    dec = torch.from_numpy(decode_tokens).long()

    with torch.no_grad():
        feats = model.model.get_image_features(pix, return_dict=True).pooler_output.float().numpy()
        logits = model(input_ids=ids, pixel_values=pix, token_type_ids=tti).logits.float().numpy()
        logits_causal = model(input_ids=ids, pixel_values=pix).logits.float().numpy()

        # Cached decode: prefill (bidirectional image blocks) then one token at a time.
        out = model(input_ids=ids, pixel_values=pix, token_type_ids=tti, use_cache=True)
        cache = out.cache
        prefill_last = out.logits[:, -1].float().numpy()
        dec_logits = []
        for s in range(N_DECODE):
            step = model(input_ids=dec[:, s:s + 1], cache=cache, use_cache=True)
            cache = step.cache
            dec_logits.append(step.logits[:, -1].float().numpy())
        decode_logits = np.stack(dec_logits, axis=1)

        # Self-checks.
        full_ids = torch.cat([ids, dec], dim=1)
        full_tti = torch.cat([tti, torch.zeros_like(dec)], dim=1)
        full = model(input_ids=full_ids, pixel_values=pix, token_type_ids=full_tti).logits.float().numpy()
    T = input_ids.shape[1]
    err_dec = np.abs(full[:, T:] - decode_logits).max()
    err_pre = np.abs(prefill_last - logits[:, -1]).max()
    err_full = np.abs(full[:, :T] - logits).max()
    print(f"two_images: T={T} W={W} | decode vs full forward max|d|={err_dec:.2e}; "
          f"prefill-last vs logits {err_pre:.2e}; full[:T] vs logits {err_full:.2e}; "
          f"logits vs logits_causal max|d|={np.abs(logits - logits_causal).max():.3f}")
    assert err_dec < 1e-4 and err_pre < 1e-5 and err_full < 1e-5
    assert np.abs(logits - logits_causal).max() > 1e-3  # bidirectional blocks matter

    # Row 1 has text more than W tokens after its image start (exercises the local window).
    img_start = int(np.argmax(input_ids[1] == BOI))
    assert T - 1 - img_start > W

    data = dict(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        pixel_values=pixel_values,
        image_features=feats.astype(np.float32),
        logits=logits.astype(np.float32),
        logits_causal=logits_causal.astype(np.float32),
        decode_tokens=decode_tokens,
        decode_logits=decode_logits.astype(np.float32),
        image_token_id=np.int32(IMAGE),
        boi_token_id=np.int32(BOI),
        eoi_token_id=np.int32(EOI),
        sliding_window=np.int32(W),
    )
    np.savez_compressed(OUT / "two_images.npz", **data)
    return data


# --------------------------------------------------------------------------------------------
# 2. preprocess.npz / preprocess.json / images/
# --------------------------------------------------------------------------------------------

# Gemma 3 checkpoints' preprocessor_config.json (google/gemma-3-*-it) uses these; the class
# defaults differ only in size (224x224).
GEMMA3_SETTINGS = dict(
    do_convert_rgb=True, do_resize=True, resample=2,  # PIL.Image.BILINEAR
    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pan_and_scan=False,
)
FIXTURE_SIZE = {"height": 56, "width": 56}


def smooth(rng: np.random.Generator, h: int, w: int, c: int, block: int) -> np.ndarray:
    """Blocky random field (random per block) plus gradients: compresses well in PNG."""
    small = rng.integers(0, 256, size=(-(-h // block), -(-w // block), c))
    big = np.repeat(np.repeat(small, block, 0), block, 1)[:h, :w]
    yy, xx = np.mgrid[0:h, 0:w]
    grad = ((xx * 255) // max(w - 1, 1) + (yy * 255) // max(h - 1, 1)) // 2
    return ((big + grad[..., None]) // 2).astype(np.uint8)


def make_images() -> list[Path]:
    IMG_DIR.mkdir(parents=True, exist_ok=True)
    files = []

    rng = np.random.default_rng(101)  # 37 wide x 53 high RGB, full noise
    p = IMG_DIR / "rgb_37x53.png"
    Image.fromarray(rng.integers(0, 256, size=(53, 37, 3), dtype=np.uint8), "RGB").save(p, optimize=True)
    files.append(p)

    rng = np.random.default_rng(102)  # 300 x 200 RGBA, alpha covers 0, 255 and partial values
    rgb = smooth(rng, 200, 300, 3, 10)
    yy, xx = np.mgrid[0:200, 0:300]
    alpha = np.clip((xx - 40) * 255 // 200, 0, 255).astype(np.uint8)
    alpha[:20] = 0
    alpha[-20:] = 255
    p = IMG_DIR / "rgba_300x200.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(p, optimize=True)
    files.append(p)

    rng = np.random.default_rng(103)  # 64 x 64 grayscale
    p = IMG_DIR / "gray_64x64.png"
    Image.fromarray(rng.integers(0, 256, size=(64, 64), dtype=np.uint8), "L").save(p, optimize=True)
    files.append(p)

    rng = np.random.default_rng(104)  # 120 x 90 palette, 16 colours, index 3 transparent (tRNS)
    idx = smooth(rng, 90, 120, 1, 6)[..., 0] // 16
    im = Image.fromarray(idx.astype(np.uint8), "P")
    im.putpalette(rng.integers(0, 256, size=16 * 3, dtype=np.uint8).tolist())
    p = IMG_DIR / "palette_120x90.png"
    im.save(p, transparency=3, optimize=True)
    files.append(p)

    rng = np.random.default_rng(105)  # 48 x 32 CMYK JPEG (lossy; decoded by PIL/libjpeg)
    p = IMG_DIR / "cmyk_48x32.jpg"
    Image.fromarray(smooth(rng, 32, 48, 4, 4), "CMYK").save(p, quality=95)
    files.append(p)
    return files


def make_preprocess(files: list[Path]) -> None:
    proc = Gemma3ImageProcessorPil(**GEMMA3_SETTINGS, size=FIXTURE_SIZE)
    arrays, per_file = {}, {}
    for p in files:
        im = Image.open(p)
        im.load()
        out = proc(im, return_tensors="np")
        pv = np.asarray(out["pixel_values"], dtype=np.float32)
        assert pv.shape == (1, 3, 56, 56), pv.shape
        arrays[p.name] = pv[0]
        per_file[p.name] = dict(
            mode=im.mode, width=im.width, height=im.height, bytes=p.stat().st_size,
            info_transparency=im.info.get("transparency"), bands=list(im.getbands()),
            takes_alpha_composite_path=bool("A" in im.getbands() or im.info.get("transparency") is not None),
        )
        # Cross-check against an explicit re-implementation of the pipeline.
        ref = reference_preprocess(im, 56)
        d = np.abs(ref - pv[0]).max()
        per_file[p.name]["max_abs_diff_vs_manual_pipeline"] = float(d)
        assert d < 1e-6, (p.name, d)
    np.savez_compressed(OUT / "preprocess.npz", **arrays)

    settings = {k: (v.value if hasattr(v, "value") else v) for k, v in proc.to_dict().items()
                if not k.startswith("_")}
    meta = dict(
        generated_by="tests/reference/make_multimodal_fixtures.py",
        transformers=transformers.__version__, pillow=PIL.__version__, torch=torch.__version__,
        processor_class="transformers.models.gemma3.image_processing_pil_gemma3.Gemma3ImageProcessorPil",
        processor_note=(
            "transformers 5.x: Gemma3ImageProcessor is the torchvision ('fast') backend "
            "(image_processing_gemma3.py, needs torchvision, not installed here); the slow/PIL "
            "backend is Gemma3ImageProcessorPil (image_processing_pil_gemma3.py), used here. "
            "Class defaults: size 224x224, resample BILINEAR, rescale 1/255, mean=std=0.5 "
            "(IMAGENET_STANDARD), do_convert_rgb True; gemma-3 checkpoints set size 896x896. "
            "The fixture uses the gemma-3 settings with size 56x56."),
        constructor_kwargs=dict(GEMMA3_SETTINGS, size=FIXTURE_SIZE),
        processor_to_dict=settings,
        pipeline=[
            "PIL.Image.open(file) (lazy; decoded by PIL)",
            "convert_to_rgb (transformers.image_transforms.convert_to_rgb, PIL path): if 'A' in "
            "image.getbands() or image.info.get('transparency') is not None: "
            "image.convert('RGBA'), then PIL.Image.alpha_composite(white RGBA (255,255,255,255) "
            "background, image).convert('RGB'); else image.convert('RGB'). -> uint8 HWC, then CHW",
            "resize: uint8 array -> PIL Image -> Image.resize((56, 56), resample=BILINEAR, "
            "reducing_gap=None) on uint8 (PIL's antialiased bilinear, result rounded to uint8); "
            "no aspect-ratio preservation, no crop/pad",
            "rescale: x.astype(float64) * (1/255) -> float32",
            "normalize: (x - 0.5) / 0.5 in float32 (mean/std cast to float32)",
        ],
        rgb_conversion={
            "RGB": "unchanged",
            "RGBA": "alpha-composited over opaque white (PIL alpha_composite), then RGB",
            "LA / PA / any mode with an 'A' band": "as RGBA",
            "L": "PIL convert('RGB'): gray replicated to R=G=B",
            "P without transparency": "PIL convert('RGB'): palette lookup",
            "P with info['transparency'] (tRNS)": "convert('RGBA') (transparent index -> alpha 0) "
                                                  "then composited over white",
            "CMYK": "PIL convert('RGB') (naive cmyk2rgb, no ICC profile): "
                    "R = round((255 - C) * (255 - K) / 255), same for G/M and B/Y (Pillow 13 "
                    "checked). The JPEG is written by PIL with an Adobe APP14 marker (inverted "
                    "CMYK); PIL/libjpeg decoding undoes the inversion.",
        },
        files=per_file,
        npz_keys="file name -> f32 [3, 56, 56] (CHW, normalized)",
    )
    (OUT / "preprocess.json").write_text(json.dumps(meta, indent=2) + "\n")


def reference_preprocess(im: Image.Image, size: int) -> np.ndarray:
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(bg, rgba).convert("RGB")
    else:
        rgb = im.convert("RGB")
    x = np.asarray(rgb.resize((size, size), resample=Image.BILINEAR))
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return x.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------
# 3. pan_and_scan.json
# --------------------------------------------------------------------------------------------

PAS = dict(pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)
PAS_SIZES = [(600, 1800), (1800, 600), (1000, 1300), (900, 5000), (300, 500), (1300, 1000),
             (2000, 500)]  # (width, height)
# Extra edge cases: truncated last crop (3001 / 3, 1279 / 2), ratio exactly at / just below 1.2,
# landscape capped at 4 crops.
PAS_EXTRA = [(1000, 3001), (1279, 1000), (1200, 1000), (1199, 1000), (5000, 900)]


def gradient_image(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.dstack([(xx * 7 + yy * 3) % 256, (xx // 256 * 64 + yy // 256 * 8) % 256,
                      (yy * 5 + xx) % 256]).astype(np.uint8)


def make_pan_and_scan() -> None:
    proc = Gemma3ImageProcessorPil(**dict(GEMMA3_SETTINGS, do_pan_and_scan=True), **PAS,
                                   size=FIXTURE_SIZE)
    table = []
    for w, h in PAS_SIZES + PAS_EXTRA:
        # Crop boxes: run HF's pan_and_scan on a coordinate image (channel 0 = y, 1 = x, CHW) and
        # read each crop's first pixel and shape.
        yy, xx = np.mgrid[0:h, 0:w]
        coords = np.stack([yy, xx]).astype(np.int32)
        crops = proc.pan_and_scan(coords, **PAS)
        boxes = []
        for c in crops:
            y0, x0 = int(c[0, 0, 0]), int(c[1, 0, 0])
            y1, x1 = y0 + c.shape[1], x0 + c.shape[2]
            assert np.array_equal(c, coords[:, y0:y1, x0:x1])
            boxes.append([x0, y0, x1, y1])

        # Full pipeline: original first, then the crops (checked pixel for pixel).
        src = gradient_image(w, h)
        pil = Image.fromarray(src, "RGB")
        out = proc(pil, return_tensors="np")
        pv = np.asarray(out["pixel_values"])
        num_crops = int(np.asarray(out["num_crops"]).reshape(-1)[0])
        assert num_crops == len(boxes) and pv.shape[0] == 1 + num_crops, (pv.shape, num_crops)
        assert np.array_equal(pv[0], reference_preprocess(pil, 56))
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert np.array_equal(pv[1 + i], reference_preprocess(pil.crop((x0, y0, x1, y1)), 56))
        table.append(dict(width=w, height=h, extra_case=(w, h) in PAS_EXTRA, num_crops=num_crops,
                          boxes_x0_y0_x1_y1=boxes,
                          crop_sizes_wh=[[b[2] - b[0], b[3] - b[1]] for b in boxes]))
        print(f"pan&scan {w}x{h}: {num_crops} crops {boxes}")

    # The pan & scan replacement text, rendered by HF's own method on a stand-in `self`.
    full_seq_fmt = "\n\n{boi_token}{image_tokens}{eoi_token}\n\n"
    stand_in = types.SimpleNamespace(full_image_sequence="<FULL_IMAGE_SEQUENCE>")
    rendered = {n: Gemma3Processor.replace_image_token(stand_in, {"num_crops": [n]}, 0) for n in (0, 2, 3)}
    init_src = inspect.getsource(Gemma3Processor.__init__)
    assert 'f"\\n\\n{tokenizer.boi_token}{image_tokens_expanded}{tokenizer.eoi_token}\\n\\n"' in init_src
    meta = dict(
        generated_by="tests/reference/make_multimodal_fixtures.py",
        transformers=transformers.__version__,
        processor_class="Gemma3ImageProcessorPil (pan_and_scan is identical in the torchvision "
                        "Gemma3ImageProcessor.pan_and_scan_batched)",
        settings=PAS,
        box_convention="[x0, y0, x1, y1] in original-image pixels, half-open; crops are numpy "
                       "slices image[:, y0:y1, x0:x1], so the last crop is truncated at the border "
                       "(crop size = ceil(W / n) or ceil(H / n))",
        crop_order="row-major over (crop_positions_h, crop_positions_w) (itertools.product); "
                   "crops are only ever a single row or a single column",
        original_image_first=True,
        original_image_first_note=(
            "_preprocess builds [image] + crops per input image, resizes each to size, and "
            "returns pixel_values with all images of the batch flattened in that order, plus "
            "num_crops (crops per input image, 0 when pan & scan does not activate)"),
        cases=table,
        prompt=dict(
            source=processing_gemma3.__file__.split("site-packages/")[-1],
            full_image_sequence_template=full_seq_fmt,
            full_image_sequence_template_note=(
                "Python str.format template with REAL newlines (two before, two after); "
                "image_tokens = image_token * image_seq_length (no separators)"),
            full_image_sequence_example_seq_len_2=full_seq_fmt.format(
                boi_token="<start_of_image>", image_tokens="<image_soft_token>" * 2,
                eoi_token="<end_of_image>"),
            full_image_sequence_source='f"\\n\\n{tokenizer.boi_token}{image_tokens_expanded}'
                                       '{tokenizer.eoi_token}\\n\\n"',
            image_seq_length_default=256,
            gemma3_tokens=dict(boi_token="<start_of_image>", image_token="<image_soft_token>",
                               eoi_token="<end_of_image>",
                               note="from the Gemma 3 tokenizer (not loaded here)"),
            placeholder_in_user_text="tokenizer.boi_token (<start_of_image>) - each occurrence is "
                                     "replaced by replace_image_token(...) for the next image",
            pan_and_scan_format=('f"Here is the original image {self.full_image_sequence} and here '
                                 'are some crops to help you see better " + " ".join('
                                 '[self.full_image_sequence] * num_crops)'),
            rendered_with_FULL_IMAGE_SEQUENCE_placeholder={str(k): v for k, v in rendered.items()},
            processor_images_kwargs_defaults=Gemma3Processor.images_kwargs,
        ),
    )
    (OUT / "pan_and_scan.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    make_two_images()
    files = make_images()
    make_preprocess(files)
    make_pan_and_scan()
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"{p.relative_to(OUT)}: {p.stat().st_size} bytes")
    print(f"total {total} bytes")
    assert total < 400_000


if __name__ == "__main__":
    main()
