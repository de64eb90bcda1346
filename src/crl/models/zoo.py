"""Model registry: every factory takes (in_channels, image_size, num_classes).

`mlp` for digits, `cnn` (the CPU stand-in that overfits like the paper's models), and 32x32
CIFAR variants of resnet18, vgg11_bn, densenet121 (the true DenseNet-121), googlenet.
Each factory records its classifier head on the model it returns (`model.crl_head`, a submodule
name) so that `crl.models.classifier_of` never has to guess which layer is the head.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.googlenet import BasicConv2d

from crl.core.errors import CRLError
from crl.core.registry import MODELS


def create_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Build a registered model for inputs [B, in_channels, image_size, image_size]."""
    if in_channels < 1 or image_size < 1 or num_classes < 2:
        raise CRLError(
            f"bad model shape: in_channels={in_channels}, image_size={image_size}, "
            f"num_classes={num_classes}; expected positive sizes and at least 2 classes"
        )
    return MODELS.get(name)(in_channels, image_size, num_classes)


def records_head(head: str | None = None) -> Callable:
    """Decorator for a model factory: set `crl_head` on the model it returns to `head` (a
    submodule name), or, when None, to the name of its last child (a Sequential ending in its
    head)."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(factory)
        def build(*args, **kwargs) -> nn.Module:
            model = factory(*args, **kwargs)
            model.crl_head = head if head is not None else list(model.named_children())[-1][0]
            return model

        return build

    return wrap


@MODELS.register("mlp",
                 description="MLP: two hidden layers of 256 ReLU units on the flattened image")
@records_head()
def mlp(in_channels: int, image_size: int, num_classes: int, hidden: int = 256) -> nn.Module:
    """Two hidden layers of `hidden` ReLU units on the flattened image."""
    d = in_channels * image_size * image_size
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


@MODELS.register("cnn",
                 description="CNN: 32-64 conv trunk, BatchNorm, a 512-unit head (docs/models.md)")
@records_head()
def cnn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """32-64 conv trunk + 512-unit FC head, BatchNorm after every conv and the FC layer.

    Memorises CIFAR-10 like the paper's models, and learns sparse greyscale data (digits) at
    lr 0.05 in a few epochs. See docs/models.md for why this shape (global-pooling CNNs underfit
    and barely leak) and why the BatchNorm (without it the net stalls or dies on digits).
    """
    pooled = image_size // 4
    if pooled < 1:
        raise CRLError(f"cnn needs images of at least 4x4 pixels, got {image_size}")

    def conv(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv(in_channels, 32), *conv(32, 32), nn.MaxPool2d(2),
        *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * pooled * pooled, 512, bias=False), nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )


def _cifar_stem(in_channels: int, out: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out, kernel_size=3, stride=1, padding=1, bias=False)


@MODELS.register("resnet18",
                 description="ResNet-18 with a CIFAR stem (He et al., CVPR 2016), torchvision")
@records_head("fc")
def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (CIFAR variant)."""
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = _cifar_stem(in_channels, 64)
    m.maxpool = nn.Identity()
    return m


@MODELS.register("vgg11_bn",
                 description="VGG-11 with BatchNorm (Simonyan & Zisserman, ICLR 2015), torchvision")
@records_head()
def vgg11_bn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """VGG11-BN with a 512-d hidden classifier layer (the paper's CRL features)."""
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for v in cfg:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )


@MODELS.register("densenet121",
                 description="DenseNet-121 (Huang et al., CVPR 2017), torchvision")
@records_head("classifier")
def densenet121(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The true DenseNet-121 (growth 32, blocks 6-12-24-16) with a 3x3 stem, no max-pool."""
    m = torchvision.models.densenet121(weights=None, num_classes=num_classes)
    m.features.conv0 = _cifar_stem(in_channels, 64)
    m.features.pool0 = nn.Identity()
    return m


class _GoogLeNetLogits(nn.Module):
    """torchvision GoogLeNet (no aux heads) for small images, returning plain logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        net = torchvision.models.googlenet(
            weights=None, num_classes=num_classes, aux_logits=False, init_weights=True
        )
        net.transform_input = False
        net.conv1 = BasicConv2d(in_channels, 64, kernel_size=3, stride=1, padding=1)
        net.maxpool1 = nn.Identity()
        net.maxpool2 = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out


@MODELS.register("googlenet",
                 description="GoogLeNet (Szegedy et al., CVPR 2015), torchvision")
@records_head("net.fc")
def googlenet(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """GoogLeNet with a 3x3 stride-1 stem and the first two max-pools removed (CIFAR variant)."""
    return _GoogLeNetLogits(in_channels, num_classes)
