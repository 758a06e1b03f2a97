"""cResNet-39: classification from a hyperprior codec's latents, without decoding pixels.

Torfason, Mentzer, Agustsson, Tschannen, Timofte, Van Gool: "Towards image understanding from deep
compression without decoding", ICLR 2018 (https://arxiv.org/abs/1803.06131). Their cResNet-k is
ResNet-50 with its front cut off: the root block (conv1, max-pool) and the stage whose maps are
larger than the compressed representation (conv2_x) are removed, the representation enters conv3_x
with that stage's downsampling stride removed, and k counts the convolutions left: conv3_x, conv4_x
and conv5_x have 4 + 6 + 3 bottleneck blocks of 3 convolutions, 39 in all (the 1x1 projection
shortcuts and the classifier are not counted, as in "ResNet-50").

Here the representation is bmshj2018's (y_hat, sigma_hat) at 1/16 of the image size, and::

    y_hat     (M, H/16) ──y_in:     conv 3x3, BN, ReLU──> (128, H/16) ─┐
    sigma_hat (M, H/16) ──sigma_in: conv 3x3, BN, ReLU──> (128, H/16) ─┴─ concat (256, H/16)
        ──layer2 (conv3_x, stride 1)──> (512, H/16)
        ──layer3 (conv4_x, stride 1)──> (1024, H/16)
        ──layer4 (conv5_x, stride 2)──> (2048, H/32) ──avgpool──fc──> logits

What differs from Torfason et al. and why:
- Input blocks. Their representation fed conv3_x directly (its first convolutions took C channels).
  With two tensors of different meaning (integer symbols, positive scales) each gets its own
  conv-BN-ReLU block, to 128 channels each, concatenated into the 256 channels that ResNet-50's
  layer2 takes; layer2..layer4 then keep torchvision's shapes, so ImageNet weights load unchanged.
  sigma_hat is fed as is (no log): the BN after its convolution normalises its scale.
- Strides. Their representation was at 1/8 scale, conv3_x's native scale. Ours is at 1/16, which is
  conv4_x's native scale, so layer2's and layer3's first blocks run at stride 1 and layer4 keeps its
  stride 2: layer3 and layer4 work at the same scale as in ResNet-50 on the full image, and the
  final map is H/32 (2x2 for a 64x64 image, never below 1x1 for the codec's smallest, 64 px).

The ResNet-50 parts are torchvision's `resnet50(weights=None)` modules `layer2`, `layer3`, `layer4`,
`avgpool` (and a new `fc`); `conv1`, `bn1`, `layer1` are not built. Nothing is downloaded.

Usage::

    from tactic.tasks.cresnet import CResNet39
    net = CResNet39(M=codec.M, num_classes=10)                      # weights="resnet50.pth" optional
    logits = net(out["y_hat"], out["sigma_hat"])                    # codec(x, decode=False) or decoded
"""
from __future__ import annotations

import torch
from torch import nn

from tactic.tasks.classifiers import load_weights

STAGE2_WIDTH = 256  # input channels of torchvision ResNet-50's layer2 (layer1's output)


def _input_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _unstride(stage: nn.Sequential) -> nn.Sequential:
    """Run a torchvision ResNet stage at stride 1 (its stride sits in block 0's 3x3 conv and shortcut)."""
    block = stage[0]
    block.conv2.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)
    return stage


class CResNet39(nn.Module):
    """ResNet-50 from its second stage, on (y_hat, sigma_hat); see the module docstring.

    Args:
        M (int): channels of the codec's latent y (and of sigma_hat)
        num_classes (int): classifier outputs
        sigma (bool): read sigma_hat too; False gives one input block y_hat -> 256 channels
        weights (str): optional local ResNet-50 state dict (torchvision names); conv1, bn1 and layer1
            are ignored, an fc of another class count keeps its initialisation
    """

    def __init__(self, M: int, num_classes: int, sigma: bool = True, weights: str | None = None):
        super().__init__()
        import torchvision.models as tvm

        self.M, self.sigma = M, sigma
        width = STAGE2_WIDTH // 2 if sigma else STAGE2_WIDTH
        self.y_in = _input_block(M, width)
        self.sigma_in = _input_block(M, width) if sigma else None
        resnet = tvm.resnet50(weights=None)
        self.layer2, self.layer3 = _unstride(resnet.layer2), _unstride(resnet.layer3)
        self.layer4, self.avgpool = resnet.layer4, resnet.avgpool
        self.fc = nn.Linear(resnet.fc.in_features, num_classes)
        if weights:
            load_weights(self, weights, heads=("fc.", "y_in.", "sigma_in."), drop=("conv1.", "bn1.", "layer1."),
                         param="latent.weights")

    def forward(self, y_hat: torch.Tensor, sigma_hat: torch.Tensor | None = None) -> torch.Tensor:
        h = self.y_in(y_hat)
        if self.sigma:
            if sigma_hat is None:
                raise ValueError("CResNet39(sigma=True) needs sigma_hat")
            h = torch.cat([h, self.sigma_in(sigma_hat)], dim=1)
        h = self.layer4(self.layer3(self.layer2(h)))
        return self.fc(torch.flatten(self.avgpool(h), 1))


class LatentHead(nn.Module):
    """cResNet-39 on (y_hat, sigma_hat) stacked as one (N, 2M, h, w) tensor (`pack`): one tensor is
    what a System passes on, and the form in which the frozen compressed-domain mode caches them."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.M = net, net.M

    @staticmethod
    def pack(y_hat: torch.Tensor, sigma_hat: torch.Tensor) -> torch.Tensor:
        return torch.cat([y_hat, sigma_hat], 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z[:, :self.M], z[:, self.M:])
