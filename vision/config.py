"""SigLIP vision-tower configuration as Gemma 3 uses it (So400m/14 at 896 px, no pooling head)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """image_size / patch_size patches per side; width, depth, mlp_dim and num_heads of the ViT;
    LayerNorm eps. `tokens_per_image` soft tokens come out of the projector's average pooling."""

    image_size: int = 896
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    eps: float = 1e-6
    tokens_per_image: int = 256

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        side = round(self.tokens_per_image ** 0.5)
        if side * side != self.tokens_per_image or self.patches_per_side % side:
            raise ValueError(f"tokens_per_image {self.tokens_per_image} must be a square whose side divides "
                             f"the {self.patches_per_side} patches per side")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def pool(self) -> int:
        """Side of the average-pooling window (4 for 64 x 64 patches -> 16 x 16 tokens)."""
        return self.patches_per_side // round(self.tokens_per_image ** 0.5)

    @classmethod
    def from_hf(cls, vision: dict[str, Any], mm_tokens_per_image: int = 256) -> "SigLIPConfig":
        act = vision.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"SigLIP activation {act!r}; Gemma 3's tower uses tanh GELU")
        if vision.get("vision_use_head"):
            raise ValueError("vision_use_head=True: Gemma 3 uses the SigLIP tower without its pooling head")
        return cls(image_size=int(vision.get("image_size", 224)), patch_size=int(vision.get("patch_size", 16)),
                   width=int(vision.get("hidden_size", 768)), depth=int(vision.get("num_hidden_layers", 12)),
                   mlp_dim=int(vision.get("intermediate_size", 3072)),
                   num_heads=int(vision.get("num_attention_heads", 12)), eps=float(vision.get("layer_norm_eps", 1e-6)),
                   tokens_per_image=int(mm_tokens_per_image))
