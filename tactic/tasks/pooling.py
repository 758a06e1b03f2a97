"""Adaptive average pooling whose backward is deterministic on CUDA.

torch's CUDA kernel for the backward of adaptive average pooling adds with atomics, so the same seed
gives different weights from run to run on a GPU (torch warns once deterministic algorithms are on).
The same windows as two averaging matrices (output rows x input rows, input columns x output columns)
give the same values through matrix products, whose backward is deterministic. Used only on CUDA with
deterministic algorithms on: elsewhere torch's own kernel runs, so CPU results stay bit for bit.
"""
from __future__ import annotations

import functools

import torch
from torch import nn


@functools.lru_cache(maxsize=64)  # built once per shape, dtype and device, not in every forward pass
def averaging_matrix(n: int, out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out, n): row i averages the inputs of adaptive pooling's window i, [floor(i n/out), ceil((i+1) n/out))."""
    m = torch.zeros(out, n, dtype=torch.float64)
    for i in range(out):
        lo, hi = (i * n) // out, -((-(i + 1) * n) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.to(dtype=dtype, device=device)


def pool_by_matrices(x: torch.Tensor, size) -> torch.Tensor:
    h, w = x.shape[-2:]
    oh, ow = (size, size) if isinstance(size, int) else size
    oh, ow = oh or h, ow or w  # None keeps that side's size, as in torch
    return averaging_matrix(h, oh, x.dtype, x.device) @ x @ averaging_matrix(w, ow, x.dtype, x.device).T


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            return pool_by_matrices(x, self.output_size)
        return super().forward(x)


def deterministic_pooling(net: nn.Module) -> nn.Module:
    """Every torch AdaptiveAvgPool2d in `net` (ours and torchvision's) becomes the one above; it has no
    state, so weights and saved files are unchanged."""
    for m in net.modules():
        if type(m) is nn.AdaptiveAvgPool2d:
            m.__class__ = AdaptiveAvgPool2d
    return net
