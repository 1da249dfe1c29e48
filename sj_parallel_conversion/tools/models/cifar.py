"""Small-image networks (CIFAR 32x32, digits 8x8) written for conversion.

Every activation site is its own module instance (made by an activation factory ``act()``), the
classifier output has no activation, and every ``forward`` is plain torch code that
``torch.fx.symbolic_trace`` can trace (no data-dependent control flow).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ActFactory = Callable[[], nn.Module]

__all__ = ["CifarCNN", "DigitsCNN", "VGG16", "BasicBlock", "ResNet18", "OptionABlock", "CifarResNet"]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]


class CifarCNN(nn.Module):
    """Five conv-BN-act layers with two max pools (after the activation) and a global average pool."""

    def __init__(self, act: ActFactory, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (32, 32, 64, 64, 128)):
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w1), act(),
            *_conv_bn(w1, w2), act(),
            nn.MaxPool2d(2),
            *_conv_bn(w2, w3), act(),
            *_conv_bn(w3, w4), act(),
            nn.MaxPool2d(2),
            *_conv_bn(w4, w5), act(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(w5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class DigitsCNN(nn.Module):
    """A tiny CNN for ``[N, 1, 8, 8]`` inputs: two conv-BN-act layers, an average pool, two linears."""

    def __init__(self, act: ActFactory, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width), act(),
            *_conv_bn(width, 2 * width), act(),
            nn.AvgPool2d(2),
        )
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.act_fc = act()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc2(self.act_fc(self.fc1(x)))


_VGG16_CFG = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")


class VGG16(nn.Module):
    """CIFAR VGG-16 with BN, as in the QCFS code: 13 conv-BN-act layers, 5 pools (``pool='avg'`` or
    ``'max'``), classifier 512 -> 4096 -> 4096 -> classes with dropout.

    ``width`` scales every convolution's channel count (``0.25``: 16 ... 128 channels, about 1/16
    of the multiply-accumulates, trainable on a CPU); ``hidden`` sets the classifier's width."""

    def __init__(self, act: ActFactory, num_classes: int = 10, in_channels: int = 3, pool: str = "avg",
                 dropout: float = 0.5, hidden: int = 4096, width: float = 1.0):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if not (isinstance(width, (int, float)) and 0 < width <= 4):
            raise ValueError(f"width must be a number in (0, 4], got {width!r}")
        layers: List[nn.Module] = []
        c = in_channels
        for v in _VGG16_CFG:
            if v == "P":
                layers.append(nn.AvgPool2d(2) if pool == "avg" else nn.MaxPool2d(2))
            else:
                v = max(1, int(round(v * width)))
                layers += [*_conv_bn(c, v), act()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden), act(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), act(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _add_residual_body(block: nn.Module, act: ActFactory, cin: int, cout: int, stride: int) -> None:
    """The residual branch both block types share, registered in checkpoint order: conv1 (3x3,
    ``stride``), bn1, act1, conv2 (3x3), bn2."""
    block.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(cout)
    block.act1 = act()
    block.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    block.bn2 = nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-act-conv-BN, shortcut (identity or 1x1 conv + BN), add, act."""

    def __init__(self, act: ActFactory, cin: int, cout: int, stride: int = 1):
        super().__init__()
        _add_residual_body(self, act, cin, cout, stride)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential()
        self.act2 = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem (64), four stages of two basic blocks (64/128/256/512), 1x1-conv
    shortcuts where the shape changes, global average pool, linear."""

    def __init__(self, act: ActFactory, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = act()
        layers, c = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(act, c, w, stride), BasicBlock(act, w, w, 1)))
            c = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class OptionABlock(nn.Module):
    """He et al. (2016) CIFAR basic block. Shortcut ``'A'``: identity, or ``x[:, :, ::2, ::2]``
    padded with zero channels (``F.pad``) where the shape changes; ``'B'``: 1x1 conv + BN there."""

    def __init__(self, act: ActFactory, cin: int, cout: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        _add_residual_body(self, act, cin, cout, stride)
        self.act2 = act()
        self.option = shortcut
        self.downsample = stride != 1 or cin != cout
        self.stride = stride
        extra = cout - cin
        self.pad_lo, self.pad_hi = extra // 2, extra - extra // 2
        if self.downsample and shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample and self.option == "A":  # structure, fixed at construction: traceable
            sc = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
            sc = F.pad(sc, (0, 0, 0, 0, self.pad_lo, self.pad_hi))
        else:
            sc = self.shortcut(x)
        return self.act2(out + sc)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 16/32/64 widths, ``n`` blocks per stage."""

    def __init__(self, act: ActFactory, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = act()
        stages, c = [], 16
        for i, w in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(OptionABlock(act, c, w, stride, shortcut))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
