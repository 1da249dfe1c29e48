"""torchvision ResNets made convertible.

torchvision's ``BasicBlock`` / ``Bottleneck`` call one ``self.relu`` module two or three times per
block; a converter that replaces activation *modules* would then share one neuron (and one
threshold) between several sites. :func:`torchvision_resnet` swaps every block's class for a
subclass whose ``forward`` calls its own ``relu1`` / ``relu2`` (/ ``relu3``) instances. The
parameters and the arithmetic are unchanged, so a torchvision state_dict loads as is and the
outputs are identical.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torchvision.models import resnet as tv_resnet

__all__ = ["ConvertibleBasicBlock", "ConvertibleBottleneck", "make_convertible", "torchvision_resnet"]


class ConvertibleBasicBlock(tv_resnet.BasicBlock):
    """``BasicBlock`` with one ReLU instance per activation site (``relu1``, ``relu2``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu2(out + identity)


class ConvertibleBottleneck(tv_resnet.Bottleneck):
    """``Bottleneck`` with one ReLU instance per activation site (``relu1``, ``relu2``, ``relu3``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu3(out + identity)


def make_convertible(model: nn.Module) -> nn.Module:
    """In place: give every torchvision ResNet block distinct ReLU modules (see module docstring)."""
    for m in model.modules():
        if type(m) is tv_resnet.BasicBlock:
            m.__class__ = ConvertibleBasicBlock
            n = 2
        elif type(m) is tv_resnet.Bottleneck:
            m.__class__ = ConvertibleBottleneck
            n = 3
        else:
            continue
        inplace = bool(getattr(m.relu, "inplace", False))
        del m.relu
        for i in range(1, n + 1):
            setattr(m, f"relu{i}", nn.ReLU(inplace=inplace))
    return model


def torchvision_resnet(depth: int, num_classes: int = 1000, weights_path: Optional[str] = None) -> nn.Module:
    """``torchvision.models.resnet{depth}(weights=None)``, its weights loaded (strictly) from the
    local state_dict file ``weights_path`` if given, made convertible with :func:`make_convertible`.
    Nothing is downloaded."""
    builders = {18: tv_resnet.resnet18, 34: tv_resnet.resnet34, 50: tv_resnet.resnet50, 101: tv_resnet.resnet101}
    if depth not in builders:
        raise ValueError(f"depth must be one of {sorted(builders)}, got {depth!r}")
    model = builders[depth](weights=None, num_classes=num_classes)
    if weights_path is not None:
        from ...fileio import load_tensor_file

        from .user import extract_state_dict, state_dict_mismatch

        state = extract_state_dict(load_tensor_file(weights_path, what="weights file"))

        problem = state_dict_mismatch(model, state)
        if problem:
            raise ValueError(f"weights {weights_path!r} do not match torchvision resnet{depth} "
                             f"(num_classes={num_classes}): {problem}")
        model.load_state_dict(state, strict=True)
    return make_convertible(model)
