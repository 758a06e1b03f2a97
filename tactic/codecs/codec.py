"""The TACTIC convolutional codec with a learned entropy model that writes real bitstreams.

TACTIC: task-aware compression through learned image codecs for machine vision.
The codec is deliberately small so it can be trained jointly with a task network::

    x ──g_a──> y ──Q──> y_hat ──g_s──> x_hat ──> task network
                          │
                 FactorizedPrior (CompressAI's EntropyBottleneck) ──> bits

    g_a: 2 x [conv 3x3, ReLU, max-pool 2]          (H x W -> H/4 x W/4, M channels; see latent_relu)
    g_s: 3 x up-convolution, ReLU between them     (2 of stride 2, the last of stride 1)

Q is rounding at inference (the symbols tactic.codecs.rangecoder writes, with the learned CDFs of
CompressAI's `EntropyBottleneck`). In training the rate term always sees y + uniform noise (the paper's
differentiable proxy, eq. 5); what g_s, and through it the task network, sees is set by `quantizer`:

    "ste"   round(y) with a straight-through gradient: exactly the latents a bitstream decodes to,
            so a jointly trained task network learns on what it is tested on (the default);
    "noise" y + uniform noise, as in the paper: the decoder and task network then train on latents
            they never meet at test time.

The paper's second block ends in a ReLU too, so y >= 0. With that ReLU a strong rate gradient or a
high learning rate can push every latent below zero, after which no gradient reaches the encoder:
the codec is dead for good (measured: 1 of 3 seeds at 300 images, lr 0.005 and 0.01, PSNR 9.8 dB,
chance accuracy). Without it (`latent_relu=False`, the default) none of 6 runs collapsed.

The output is clamped to [0, 1] in training too (with a straight-through gradient, so out-of-range
pixels still learn), because decoded images are clamped.

Args:
    in_channels (int): image channels (1 for grey, 3 for RGB)
    N (int): channels of the hidden convolutions
    M (int): channels of the latent y
    quantizer (str): "ste" or "noise", what g_s sees in training (see above)
    latent_relu (bool): end g_a with the paper's ReLU (y >= 0; see above)
"""
from __future__ import annotations

import torch
from tactic.codecs import _compressai  # noqa: F401  (before compressai: skips its point-cloud imports)
from compressai.models import CompressionModel
from compressai.ops import quantize_ste
from torch import nn

from tactic.codecs.entropy import FactorizedPrior
from tactic.errors import TacticError

QUANTIZERS = ("ste", "noise")


def clamp_ste(x: torch.Tensor) -> torch.Tensor:
    """x clamped to [0, 1], with the identity's gradient (a hard clamp would stop it outside)."""
    return x + (x.clamp(0, 1) - x).detach()


class TacticCodec(CompressionModel):
    arch = "tactic"  # the tag model files carry (tactic.experiment.system.CODECS)
    downsampling = 4

    def __init__(self, in_channels: int = 3, N: int = 32, M: int = 8, quantizer: str = "ste", latent_relu: bool = False):
        super().__init__()
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.in_channels, self.N, self.M, self.quantizer, self.latent_relu = in_channels, N, M, quantizer, latent_relu
        self.g_a = nn.Sequential(
            nn.Conv2d(in_channels, N, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(N, M, 3, padding=1), *([nn.ReLU(inplace=True)] if latent_relu else []), nn.MaxPool2d(2),
        )
        self.g_s = nn.Sequential(
            nn.ConvTranspose2d(M, N, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(N, N, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            # No ReLU on the output: a dead output ReLU zeroes every gradient and the codec never
            # recovers (seen in 1 of 3 seeds). Outputs are clamped to [0, 1] when decoding instead.
            nn.ConvTranspose2d(N, in_channels, 3, stride=1, padding=1),
        )
        self.entropy_bottleneck = FactorizedPrior(M)

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.downsampling or w % self.downsampling:
            raise TacticError(f"image size {h}x{w} must be a multiple of {self.downsampling}")

    def forward(self, x: torch.Tensor) -> dict:
        self._check_size(x)
        y = self.g_a(x)
        y_hat, y_likelihoods = self.entropy_bottleneck(y)  # training: y + noise; inference: rounded
        if self.training and self.quantizer == "ste":
            # Rounded around the medians, as the coder rounds (`compress`) and eval mode does.
            medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
            y_hat = quantize_ste(y - medians) + medians
        return {"x_hat": clamp_ste(self.g_s(y_hat)), "likelihoods": {"y": y_likelihoods}}

    def compress(self, x: torch.Tensor, likelihoods: bool = False) -> dict:
        """One bitstream per image; `shape` is the latent size that `decompress` needs. With
        `likelihoods`, the entropy model's likelihoods of the same latents (eval mode: rounded, as
        `forward` gives them), for the rate estimate without a second encoder and decoder pass."""
        self._check_size(x)
        y = self.g_a(x)
        out = {"strings": [self.entropy_bottleneck.compress(y)], "shape": y.shape[-2:]}
        if likelihoods:
            out["likelihoods"] = {"y": self.entropy_bottleneck(y, training=False)[1]}
        return out

    def decompress(self, strings: list, shape) -> dict:
        y_hat = self.entropy_bottleneck.decompress(strings[0], shape)
        return {"x_hat": self.g_s(y_hat).clamp_(0, 1)}

    @property
    def config(self) -> dict:
        # The quantizer is a training setting (set from params where training happens), not part of the model.
        return {"in_channels": self.in_channels, "N": self.N, "M": self.M, "latent_relu": self.latent_relu}
