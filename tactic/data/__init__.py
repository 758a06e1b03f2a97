"""Data adapters (one module per distributed layout) and the prepared form all stages read."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from tactic.data.prepared import Split


def to_float(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float in [0, 1] on `device` (float input: not rescaled)."""
    # A copy: memory-mapped splits are read-only, and the uint8 batch is cheap next to the float one.
    t = torch.from_numpy(np.array(images)) if not isinstance(images, torch.Tensor) else images
    t = t.to(device, non_blocking=True).permute(0, 3, 1, 2)
    # uint8 pixels to [0, 1]; float arrays (latents cached by a compressed-domain mode) as they are.
    return t.float().div_(255) if t.dtype == torch.uint8 else t.float()


def batches(
    split: Split,
    batch_size: int,
    device,
    shuffle_seed: Optional[int] = None,
    limit_batches: Optional[int] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; the order depends only on `shuffle_seed`, so a resumed epoch
    sees the same batches."""
    n = len(split)
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    count = (n + batch_size - 1) // batch_size
    if limit_batches:
        count = min(count, limit_batches)
    for b in range(count):
        # Sorted indices read a memory-mapped split sequentially.
        idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
        images = split.images[idx]
        # Masks are stored as uint8; losses and metrics index with int64.
        yield to_float(images, device), torch.from_numpy(split.labels[idx].astype(np.int64)).to(device, non_blocking=True)


def num_batches(split: Split, batch_size: int, limit_batches: Optional[int] = None) -> int:
    count = (len(split) + batch_size - 1) // batch_size
    return min(count, limit_batches) if limit_batches else count
