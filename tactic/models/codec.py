"""The TACTIC convolutional codec with a learned entropy model that writes real bitstreams.

TACTIC: task-aware compression through learned image codecs for machine vision.
The codec is deliberately small so it can be trained jointly with a task network::

    x ──g_a──> y ──Q──> y_hat ──g_s──> x_hat ──> task network
                          │
                 EntropyBottleneck (factorized prior) ──> bits

    g_a: 2 x [conv 3x3, ReLU, max-pool 2]          (H x W -> H/4 x W/4, M channels)
    g_s: 3 x up-convolution, ReLU between them     (2 of stride 2, the last of stride 1)

Q is additive uniform noise while training (a differentiable proxy) and rounding at inference;
both come from CompressAI's `EntropyBottleneck`, which also holds the learned CDFs that
`compress`/`decompress` use with its rANS coder.

Args:
    in_channels (int): image channels (1 for grey, 3 for RGB)
    N (int): channels of the hidden convolutions
    M (int): channels of the latent y
"""
from __future__ import annotations

import torch
from tactic.models import _compressai  # noqa: F401  (before compressai: skips its point-cloud imports)
from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel
from torch import nn


class TacticCodec(CompressionModel):
    downsampling = 4

    def __init__(self, in_channels: int = 3, N: int = 32, M: int = 8):
        super().__init__()
        self.in_channels, self.N, self.M = in_channels, N, M
        self.g_a = nn.Sequential(
            nn.Conv2d(in_channels, N, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(N, M, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.g_s = nn.Sequential(
            nn.ConvTranspose2d(M, N, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(N, N, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            # No ReLU on the output: a dead output ReLU zeroes every gradient and the codec never
            # recovers (seen in 1 of 3 seeds). Outputs are clamped to [0, 1] when decoding instead.
            nn.ConvTranspose2d(N, in_channels, 3, stride=1, padding=1),
        )
        self.entropy_bottleneck = EntropyBottleneck(M)

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.downsampling or w % self.downsampling:
            raise ValueError(f"image size {h}x{w} must be a multiple of {self.downsampling}")

    def forward(self, x: torch.Tensor) -> dict:
        self._check_size(x)
        y = self.g_a(x)
        y_hat, y_likelihoods = self.entropy_bottleneck(y)
        return {"x_hat": self.g_s(y_hat), "likelihoods": {"y": y_likelihoods}}

    def compress(self, x: torch.Tensor) -> dict:
        """One bitstream per image; `shape` is the latent size that `decompress` needs."""
        self._check_size(x)
        y = self.g_a(x)
        return {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.shape[-2:]}

    def decompress(self, strings: list, shape) -> dict:
        y_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1)}

    @property
    def config(self) -> dict:
        return {"in_channels": self.in_channels, "N": self.N, "M": self.M}
