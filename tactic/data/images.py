"""Decoding one image (and its label mask) into the prepared form's fixed-size uint8 arrays.

These functions run in `prepare`'s worker processes: they import Pillow and NumPy only, and
report a bad file as a `Bad` value (path and reason) instead of raising, so the parent decides
whether to skip it or, with `prepare.strict`, stop.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

# Pillow's error types for unreadable or truncated files, and its guard against decompression bombs.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class Bad:
    path: str
    reason: str


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Grey, palette, CMYK and RGBA images to RGB (or to grey for 1-channel data). Transparent areas
    take the colour stored under them: alpha carries no information for the task networks."""
    if channels == 1:
        return im if im.mode == "L" else im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode == "I;16" or im.mode == "I":
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit grey down to 8 bits
    return im if im.mode == "RGB" else im.convert("RGB")


def fit(im: Image.Image, size: Optional[int], resample) -> Image.Image:
    """Shorter side to `size`, then the centre `size` x `size` crop; unchanged when `size` is None."""
    if size is None or im.size == (size, size):
        return im
    return ImageOps.fit(im, (size, size), resample, centering=(0.5, 0.5))


def load_image(item, size: Optional[int], channels: int) -> np.ndarray | Bad:
    """(size, size, channels) uint8 from a file path or an (H, W, C) array."""
    if isinstance(item, np.ndarray):
        im = Image.fromarray(item[..., 0] if item.shape[-1] == 1 else item)
        return _as_array(fit(to_mode(im, channels), size, Image.BICUBIC), channels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. odd EXIF: the pixels still decode
            with Image.open(item) as im:
                if size is not None:
                    # JPEG: decode at a reduced scale (DCT scaling), still no smaller than `size`.
                    im.draft(None, (size, size))
                im.load()
                return _as_array(fit(to_mode(im, channels), size, Image.BICUBIC), channels)
    except DECODE_ERRORS as err:
        return Bad(str(item), f"{type(err).__name__}: {err}")


def load_mask(path: Path, size: Optional[int], lut: Optional[np.ndarray]) -> np.ndarray | Bad:
    """(size, size) uint8 label mask: nearest-neighbour resizing (labels must not be blended), then `lut`."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = np.asarray(fit(im if im.mode in ("L", "P") else im.convert("L"), size, Image.NEAREST))
    except DECODE_ERRORS as err:
        return Bad(str(path), f"{type(err).__name__}: {err}")
    return lut[mask] if lut is not None else mask


def load_pair(item, size: Optional[int], channels: int, target, lut: Optional[np.ndarray]):
    """Worker entry point: (image, target) where target is the class index or the mask (a file or an array)."""
    image = load_image(item, size, channels)
    if isinstance(image, Bad) or not isinstance(target, (Path, np.ndarray)):
        return image, target
    if isinstance(target, np.ndarray):  # a mask made in memory (the embedded canvases)
        return image, np.asarray(fit(Image.fromarray(target), size, Image.NEAREST))
    mask = load_mask(target, size, lut)
    if not isinstance(mask, Bad) and mask.shape != image.shape[:2]:
        return Bad(str(target), f"label mask is {mask.shape[1]}x{mask.shape[0]}, its image {image.shape[1]}x{image.shape[0]}"), None
    return (mask, None) if isinstance(mask, Bad) else (image, mask)


def _as_array(im: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if channels == 1 else a
