"""SigLIP image encoder for multimodal Gemma 3, its projector, preprocessing and Pan & Scan."""

from vision.config import SigLIPConfig
from vision.preprocess import pan_and_scan, preprocess
from vision.siglip import Projector, SigLIPEncoder, VisionTower

__all__ = ["Projector", "SigLIPConfig", "SigLIPEncoder", "VisionTower", "pan_and_scan", "preprocess"]
