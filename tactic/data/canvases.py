"""A segmentation set made of real item pixels: canvases holding several items at random places.

Each canvas is black and holds a few items (e.g. Fashion-MNIST's 28x28 pictures) pasted at random
places; they may overlap, a later item covering earlier ones only where its own foreground is.
The mask labels each pixel with 1 + the class of the item whose pixel is shown there, 0 (background)
elsewhere, so the labels follow from the pixels alone. Everything is drawn from `seed`.

    images, labels = fashion_mnist.load(root, "train")          # (N, 28, 28, 1) uint8, (N,)
    canvases, masks = make_canvases(images, labels, 3000, seed=0)  # (3000, 64, 64, 1), (3000, 64, 64)
    classes = canvas_classes(fashion_mnist.CLASSES)               # ["background", "T-shirt/top", ...]

Draw each split's canvases from that split's items (and its own seed), so no item crosses splits.
"""
from __future__ import annotations

import numpy as np

from tactic.errors import TacticError

BACKGROUND = 0


def canvas_classes(item_classes) -> list[str]:
    """Mask class names: index 0 is the background, index 1 + c the item class c."""
    return ["background", *item_classes]


def canvas_layout(num_sources: int, count: int, size: int = 64, item_shape=(28, 28), items=(2, 4), seed: int = 0) -> dict:
    """Where `make_canvases` puts which item, in pasting order.

    Returns (count, max(items)) int64 arrays: `index` (source item, -1 for an unused slot) and the
    top-left corner `y`, `x`. Each canvas holds between items[0] and items[1] items, bounds included.
    """
    lo, hi = items
    h, w = item_shape
    if not 0 <= lo <= hi or hi == 0:
        raise TacticError(f"items: need 0 <= min <= max and max > 0, got {items}")
    if h > size or w > size:
        raise TacticError(f"items of {h}x{w} do not fit a {size}x{size} canvas")
    rng = np.random.default_rng(seed)
    used = rng.integers(lo, hi + 1, size=count)
    index = rng.integers(0, num_sources, size=(count, hi))
    index[np.arange(hi)[None, :] >= used[:, None]] = -1
    return {"index": index, "y": rng.integers(0, size - h + 1, size=(count, hi)),
            "x": rng.integers(0, size - w + 1, size=(count, hi))}


def make_canvases(images: np.ndarray, labels: np.ndarray, count: int, size: int = 64, items=(2, 4), seed: int = 0,
                  threshold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Canvases (count, size, size, C) uint8 and their masks (count, size, size) uint8.

    Args:
        images: source items (N, h, w, C) uint8 on a black background.
        labels: their classes (N,), in [0, 254).
        items: (min, max) items per canvas.
        threshold: a pixel is foreground when its brightest channel exceeds this. Fashion-MNIST's
            background is exactly 0, so the default keeps every item pixel.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"need images (N, h, w, C) uint8 and N labels, got {images.shape} {images.dtype} and {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < 254:
        raise ValueError("labels must lie in [0, 254) to fit a uint8 mask beside the background")
    _, h, w, c = images.shape
    layout = canvas_layout(len(images), count, size, (h, w), items, seed)
    canvases = np.zeros((count, size, size, c), np.uint8)
    masks = np.full((count, size, size), BACKGROUND, np.uint8)
    # One slot at a time over all canvases: a slot holds at most one item per canvas, so no write
    # within a step collides, and later slots overwrite earlier ones.
    for k in range(layout["index"].shape[1]):
        canvas = np.flatnonzero(layout["index"][:, k] >= 0)
        source = layout["index"][canvas, k]
        item = images[source]
        n, r, col = np.nonzero(item.max(-1) > threshold)
        rows, cols = layout["y"][canvas, k][n] + r, layout["x"][canvas, k][n] + col
        canvases[canvas[n], rows, cols] = item[n, r, col]
        masks[canvas[n], rows, cols] = 1 + labels[source][n]
    return canvases, masks
