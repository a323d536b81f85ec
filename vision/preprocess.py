"""Image preprocessing for Gemma 3: any input -> RGB -> bilinear (antialiased) resize -> [-1, 1]; Pan & Scan."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError


def to_pil(image) -> Image.Image:
    """A PIL image from a PIL image, a path, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()
                return f.copy()
        except FileNotFoundError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}") from e
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 [H, W(, C)], got dtype {array.dtype}; pass floats only "
                            f"to the model, after preprocess")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
        return Image.fromarray(array)
    raise TypeError(f"image must be a PIL image, a path or a uint8 array, got {type(image).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited onto white and 16-bit or float modes scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image, image_size: int = 896) -> np.ndarray:
    """float32 [image_size, image_size, 3] in [-1, 1] from a PIL image, a path or a uint8 array."""
    rgb = to_rgb(to_pil(image))
    if min(rgb.size) < 1:
        raise ValueError(f"image has no pixels (size {rgb.size})")
    resized = rgb.resize((image_size, image_size), resample=Image.BILINEAR)
    return (np.asarray(resized, np.float32) / 255.0 - 0.5) / 0.5


def pan_and_scan(image, min_crop_size: int = 256, max_crops: int = 4, min_ratio: float = 1.2) -> list[Image.Image]:
    """Non-overlapping crops along the long side of an elongated image (the full image not included).

    Applies when the long / short side ratio reaches `min_ratio`: about long/short crops (rounded half
    up), at least 2 and at most `max_crops`, each side at least `min_crop_size`. Empty list otherwise.
    Crops come left to right (landscape) or top to bottom (portrait).
    """
    pil = to_rgb(to_pil(image))
    width, height = pil.size
    landscape = width >= height
    long, short = (width, height) if landscape else (height, width)
    if long / short < min_ratio:
        return []
    n = min(int(math.floor(long / short + 0.5)), long // min_crop_size)
    n = min(max(2, n), max_crops)
    crop_long, crop_short = math.ceil(long / n), short
    if min(crop_long, crop_short) < min_crop_size:
        return []
    boxes = [(i * crop_long, 0, min((i + 1) * crop_long, long), short) for i in range(n)]
    if not landscape:
        boxes = [(y0, x0, y1, x1) for x0, y0, x1, y1 in boxes]
    return [pil.crop(box) for box in boxes]
