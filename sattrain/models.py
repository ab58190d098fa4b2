"""Classifiers by name: CIFAR-style ResNets (3x3 stem, no max-pool), WRN, and a small CNN.

Every model takes images in [0, 1], NCHW float, and returns logits; any normalisation
would live inside the model (docs/method.md and RobustBench both fix inputs to [0, 1], so
epsilons are in pixel units). Spatial size is free: the head pools adaptively.

>>> model = create_model("resnet18", num_classes=10)      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from satdata.errors import SatkitError

_MODELS: dict[str, Callable[[int], nn.Module]] = {}
_SUMMARIES: dict[str, str] = {}


def register_model(name: str, summary: str) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    def deco(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        _SUMMARIES[name] = summary
        return fn

    return deco


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_summary(name: str) -> str:
    return _SUMMARIES[name]


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a freshly initialised model; raises SatkitError naming --model if unknown."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise SatkitError(f"--model: unknown model {name!r} (known: {', '.join(model_names())})") from None
    if num_classes < 1:
        raise SatkitError(f"--model: need at least one class, got {num_classes}")
    return fn(num_classes)


def last_conv_stage(model: nn.Module) -> nn.Module:
    """The module whose output is the last convolutional feature map (for Grad-CAM)."""
    stage = getattr(model, "features_out", None)
    if stage is None:
        raise SatkitError(f"{type(model).__name__} does not name its last conv stage")
    return stage


# --------------------------------------------------------------------------- small CNN


class SmallCNN(nn.Module):
    """Four 3x3 conv layers (32-32-64-64, BN, ReLU, two 2x2 max-pools) and a linear head.

    Small enough to train on a CPU in seconds on 16x16 or 32x32 stores.
    """

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w),
        )
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * w, num_classes)
        self.features_out = self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))


@register_model("small-cnn", "4-layer CNN (~0.1M params): quick CPU runs and tests")
def small_cnn(num_classes: int) -> nn.Module:
    return SmallCNN(num_classes)


# --------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class CifarResNet(nn.Module):
    """ResNet for small images: 3x3 stem, no max-pool, four stages of 64-128-256-512."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int, preact: bool = False) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(64)
        cin = 64
        stages = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, width, stride))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_bn = nn.BatchNorm2d(512) if preact else nn.Identity()
        self.fc = nn.Linear(512, num_classes)
        self.features_out = self.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.final_bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register_model("resnet10", "CIFAR-style ResNet-10 ([1,1,1,1]), the paper's student")
def resnet10(num_classes: int) -> nn.Module:
    return CifarResNet(BasicBlock, [1, 1, 1, 1], num_classes)


@register_model("resnet18", "CIFAR-style ResNet-18 ([2,2,2,2])")
def resnet18(num_classes: int) -> nn.Module:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@register_model("resnet34", "CIFAR-style ResNet-34 ([3,4,6,3]), the paper's teacher")
def resnet34(num_classes: int) -> nn.Module:
    return CifarResNet(BasicBlock, [3, 4, 6, 3], num_classes)


@register_model("preact-resnet18", "Pre-activation ResNet-18, the usual adversarial-training baseline")
def preact_resnet18(num_classes: int) -> nn.Module:
    return CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes, preact=True)


# --------------------------------------------------------------------------- Wide ResNet


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.drop:
            o = F.dropout(o, p=self.drop, training=self.training)
        return self.conv2(o) + sc


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis), as used by RobustBench for CIFAR."""

    def __init__(self, depth: int, k: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                layers.append(WideBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.features_out = self.blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


@register_model("wrn-28-10", "Wide ResNet-28-10 (36M params): GPU only")
def wrn_28_10(num_classes: int) -> nn.Module:
    return WideResNet(28, 10, num_classes)
