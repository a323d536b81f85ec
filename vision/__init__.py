"""SigLIP image encoder for multimodal Gemma 3, its projector, preprocessing and Pan & Scan.

The encoder's names load vision.siglip (flax, jax) on first use, so that `vision.config`, which gemma.config
reads, costs numpy and PIL only."""

import importlib

from vision.config import SigLIPConfig
from vision.preprocess import pan_and_scan, preprocess

_LAZY = ("Projector", "SigLIPEncoder", "VisionTower")

__all__ = ["Projector", "SigLIPConfig", "SigLIPEncoder", "VisionTower", "pan_and_scan", "preprocess"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module("vision.siglip"), name)
    if name == "siglip":
        return importlib.import_module("vision.siglip")
    raise AttributeError(f"module 'vision' has no attribute {name!r}")
