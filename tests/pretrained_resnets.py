"""The public pretrained CIFAR-10 ResNet-32/44 (option-A shortcuts) as ``--model`` factories.

``sj-parallel evaluate --model pretrained_resnets:resnet32 --weights resnet32-d509ac18.th`` with
``tests`` on ``PYTHONPATH``. The layout follows the files' README (``../shared/data/
pretrained_cifar10_resnets/README.md``): module names ``conv1``, ``bn1``, ``layerK.M.{conv1, bn1,
conv2, bn2}`` and ``linear``, a parameter-free shortcut where the shape changes, and one ReLU
module per site so that conversion sees every activation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Files and the accuracy their README gives on the full CIFAR-10 test set.
FILES = {"resnet32": ("resnet32-d509ac18.th", 92.63), "resnet44": ("resnet44-014dd654.th", 93.10)}
#: The normalisation the networks were trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ENV_VAR = "SJPC_PRETRAINED_DIR"


def pretrained_dir() -> Optional[Path]:
    """The folder named by ``$SJPC_PRETRAINED_DIR`` (``tools/env.sh`` sets it), or ``None``."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


class Block(nn.Module):
    """Basic block; where the shape changes the shortcut takes every second pixel and pads the
    channel axis with ``planes // 4`` zero channels on each side."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = stride != 1 or cin != planes
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.downsample:  # fixed at construction: traceable
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.relu2(out + x)


class ResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        cin = 16
        for k, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for m in range(n):
                blocks.append(Block(cin, planes, 2 if k > 1 and m == 0 else 1))
                cin = planes
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.pool(x), 1))


def resnet32(num_classes: int = 10) -> ResNet:
    return ResNet(5, num_classes)


def resnet44(num_classes: int = 10) -> ResNet:
    return ResNet(7, num_classes)
