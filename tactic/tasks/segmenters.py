"""Task networks for semantic segmentation: each returns per-pixel logits (N, num_classes, H, W).

`small-fcn` is sized for the embedded 64x64 canvases (`tactic.data.canvases`); `fcn_resnet101` is
the TACTIC paper's Cityscapes network, built without weights (nothing is downloaded). Both take an
optional local state dict; a head with another class count (torchvision's COCO/VOC checkpoints have
21 classes) is dropped and rebuilt, and so is torchvision's auxiliary head, which we do not train.

    net = build_segmenter("small-fcn", in_channels=1, num_classes=11)
    logits = net(torch.rand(8, 1, 64, 64))  # (8, 11, 64, 64)
    net = build_segmenter("fcn_resnet101", 3, 19, weights="fcn_resnet101_coco-7ecb50ca.pth")
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from tactic.errors import TacticError
from tactic.tasks.classifiers import _RepeatChannels, load_weights


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallFCN(nn.Module):
    """A fully convolutional net for 64x64 canvases of 28x28 items: a few CPU epochs train it.

        x -> block(w) -> pool -> block(2w) x2 -> pool -> block(4w), dilated 2, 4 -> 1x1 conv -> bilinear x4 -> logits

    Naming an item needs its whole shape, so the receptive field (about 70 px) covers an item
    wherever a pixel lies on it; the dilated convolutions buy that width at 1/4 resolution.

    Args:
        in_channels: image channels (1 for the embedded grey data).
        num_classes: classes per pixel, background included.
        width: channels of the first block (w above).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w), nn.MaxPool2d(2),
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), _block(4 * w, 4 * w, dilation=2), _block(4 * w, 4 * w, dilation=4),
        )
        self.head = nn.Conv2d(4 * w, num_classes, 1)

    def forward(self, x):
        logits = self.head(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class _Logits(nn.Module):
    """Unwraps torchvision's segmentation output dict to the "out" logits."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["out"]


def build_segmenter(arch: str, in_channels: int, num_classes: int, width: int = 16, weights: str | None = None) -> nn.Module:
    """A segmentation network whose forward returns logits (N, num_classes, H, W) at the input size.

    Args:
        arch: "small-fcn" or "fcn_resnet101".
        in_channels: 1 or 3 for torchvision models (grey is repeated to RGB); any for small-fcn.
        width: small-fcn only.
        weights: optional local state dict file; a head of another shape is replaced.
    """
    if arch == "small-fcn":
        net = SmallFCN(in_channels, num_classes, width)
        if weights:
            load_weights(net, weights, ("head",))
        return net
    if arch != "fcn_resnet101":
        raise TacticError(f"model.task.arch: unknown segmentation network {arch!r}")
    if in_channels not in (1, 3):
        raise TacticError(f"{arch} takes 1 or 3 input channels, not {in_channels}")
    from torchvision.models.segmentation import fcn_resnet101

    net = fcn_resnet101(weights=None, weights_backbone=None, aux_loss=False, num_classes=num_classes)
    if weights:
        # torchvision's auxiliary FCN head is not built here (aux_loss=False): its weights are dropped.
        load_weights(net, weights, ("classifier.4",), drop=("aux_classifier.",))
    net = _Logits(net)
    return net if in_channels == 3 else _RepeatChannels(net)
