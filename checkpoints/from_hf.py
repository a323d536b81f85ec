"""Gemma 3 from an HF safetensors directory (config.json + *.safetensors).

Accepted key spellings of the text model (X = `embed_tokens.weight`, `layers.0...`):
  Gemma3ForCausalLM                         model.X
  Gemma3ForConditionalGeneration, Hub / v5  language_model.model.X
  Gemma3ForConditionalGeneration, v5 names  model.language_model.X
Vision tower: `vision_tower.vision_model.X` (Hub), `vision_tower.X` (v5 file) or
`model.vision_tower.X` (v5 names); projector: `[model.]multi_modal_projector.X`.
With text_only=True the vision and projector tensors are never read.
"""

from __future__ import annotations

import glob
import json
import os

from safetensors import safe_open

from checkpoints.params import build_model
from gemma.config import GemmaConfig

_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_VISION_PREFIXES = {"model.vision_tower.vision_model.": "vision_tower.", "vision_tower.vision_model.": "vision_tower.",
                    "model.vision_tower.": "vision_tower.", "vision_tower.": "vision_tower.",
                    "model.multi_modal_projector.": "multi_modal_projector.",
                    "multi_modal_projector.": "multi_modal_projector."}
_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and bool(glob.glob(os.path.join(path, "*.safetensors")))


def unified_key(key: str, with_vision: bool) -> str | None:
    """HF key -> our HF-style key (text X, `vision_tower.X`, `multi_modal_projector.X`), or None when
    the tensor is not read (tied head; vision and projector when `with_vision` is False)."""
    if key in _TIED_HEADS:
        return None
    for prefix, ours in _VISION_PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):] if with_vision else None
    for prefix in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key  # reported as unexpected by the shape check


def hf_config(path: str) -> GemmaConfig:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    text = raw.get("text_config", raw)
    if text.get("use_bidirectional_attention"):
        raise ValueError(f"{path}: use_bidirectional_attention=True is an embedding model, not a Gemma 3 decoder")
    act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{path}: hidden activation {act!r}; Gemma 3 uses tanh GELU (gelu_pytorch_tanh)")
    return GemmaConfig.from_hf(raw)


def load_hf(path: str | os.PathLike, dtype, text_only: bool = False) -> "Transformer":  # noqa: F821
    path = os.fspath(path)
    config = hf_config(path)
    if text_only:
        config = config.text_only()
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    where: dict[str, tuple[str, str]] = {}  # text key -> (file, original key)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, framework="flax") as f:
                for key in f.keys():
                    x = unified_key(key, config.vision is not None)
                    if x is not None:
                        where[x] = (file, key)
                        shapes[x] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from e

    handles: dict[str, object] = {}

    def read(key: str):
        file, original = where[key]
        if file not in handles:
            handles[file] = safe_open(file, framework="flax")
        try:
            return handles[file].get_tensor(original)
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {original!r} (truncated file?): {e}") from e

    return build_model(config, dtype, shapes, read, os.path.basename(path.rstrip("/")) or path)
