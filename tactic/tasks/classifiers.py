"""Task networks for classification.

`small-cnn` is sized for the embedded 28x28 data; the torchvision models are built without
weights (nothing is downloaded) and take an optional local state dict, e.g. ImageNet weights
the user has on disk. An ImageNet head (1000 classes) is accepted and replaced.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from tactic.errors import TacticError
from tactic.io import BadFileError, load_torch


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head on a 4x4 map: enough for Fashion-MNIST in a few CPU epochs.

    The head keeps a coarse spatial layout (pooling to 4x4, not 1x1): with so few layers the
    receptive field is small and global pooling learned markedly slower in our trials.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width), nn.MaxPool2d(2),
            _block(width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class _RepeatChannels(nn.Module):
    """Feeds grey images to networks built for RGB."""

    def __init__(self, net: nn.Module, channels: int = 3):
        super().__init__()
        self.net, self.channels = net, channels

    def forward(self, x):
        return self.net(x.expand(-1, self.channels, -1, -1))


def load_weights(model: nn.Module, path: str, heads: tuple[str, ...], drop: tuple[str, ...] = (),
                 param: str = "model.task.weights") -> None:
    """A local state dict into `model`. Keys under `heads` whose shape differs (another class count)
    keep our initialisation; keys under `drop` (parts we do not build) are ignored; anything else
    that does not fit is an error naming `param` and the file."""
    file = Path(path)
    state = load_torch(file, param)
    if not isinstance(state, dict):
        raise BadFileError(f"{param}: {file} holds a {type(state).__name__}, not a state dict")
    state = state.get("state_dict", state)
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not k.startswith(drop) and not (k.startswith(heads) and own.get(k, v).shape != v.shape)}
    shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if shapes:
        raise BadFileError(f"{param}: {file} does not fit {type(model).__name__} (wrong architecture): "
                           f"shapes differ: {', '.join(shapes[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(heads)]
    if missing or unexpected:
        raise BadFileError(f"{param}: {file} does not fit {type(model).__name__} (wrong architecture): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_classifier(arch: str, in_channels: int, num_classes: int, width: int = 16, weights: str | None = None,
                     weights_param: str = "model.task.weights") -> nn.Module:
    """`weights_param` is the param that names `weights`, for error messages."""
    if arch == "small-cnn":
        net = SmallCNN(in_channels, num_classes, width)
        if weights:
            load_weights(net, weights, ("head",), param=weights_param)
        return net
    import torchvision.models as tvm

    if arch == "inception_v3":
        net = tvm.inception_v3(weights=None, aux_logits=False, init_weights=True, transform_input=False)
    elif arch in ("resnet18", "resnet50"):
        net = getattr(tvm, arch)(weights=None)
    else:
        raise TacticError(f"model.task.arch: unknown {arch!r}")
    if weights:
        # Inception's auxiliary head is not built here (aux_logits=False): its weights are dropped.
        load_weights(net, weights, ("fc",), drop=("AuxLogits.",), param=weights_param)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net if in_channels == 3 else _RepeatChannels(net)
