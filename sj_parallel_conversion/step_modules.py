"""The step modules canonicalisation writes into a graph, for operations SpikingJelly's step-mode
adapter has no module for: constant scaling, channel chunks, constant padding, and a ReLU kept
analog. Saved networks name them ``sj_parallel_conversion.<class>`` (:mod:`~.serialization`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import base, functional

__all__ = ["AnalogReLU", "ChunkPart", "ConstantScale", "StepPad"]


class ConstantScale(nn.Module, base.StepModule):
    """``x * c`` or ``x / c`` for a constant ``c`` (a number, a parameter or a shape value).

    Elementwise and the same at every step, so it commutes with the time mean; as a module it
    passes SpikingJelly's step-mode adapter, which knows no division.
    """

    def __init__(self, divide: bool, factor: Optional[float] = None, step_mode: str = "s"):
        super().__init__()
        self.divide = bool(divide)
        self.factor = factor
        self.step_mode = step_mode

    def supported_step_mode(self):
        return ("s", "m")

    def forward(self, x: torch.Tensor, factor=None) -> torch.Tensor:
        c = self.factor if factor is None else factor
        return x / c if self.divide else x * c

    def extra_repr(self) -> str:
        op = "/" if self.divide else "*"
        return f"x {op} {'input' if self.factor is None else self.factor}, step_mode={self.step_mode}"


class ChunkPart(nn.Module, base.StepModule):
    """Part ``index`` of ``x.chunk(chunks, dim)`` (ShuffleNet's channel split) as a step module."""

    def __init__(self, chunks: int, index: int, dim: int, step_mode: str = "s"):
        super().__init__()
        self.chunks, self.index, self.dim = int(chunks), int(index), int(dim)
        self.step_mode = step_mode

    def supported_step_mode(self):
        return ("s", "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return functional.seq_to_ann_forward(x, self._part)
        return self._part(x)

    def _part(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.chunks, self.dim)[self.index]

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, index={self.index}, dim={self.dim}, step_mode={self.step_mode}"


class AnalogReLU(nn.ReLU):
    """A ReLU kept analog in the converted network (the paper keeps ImageNet ResNets' stem so).

    Only allowed where no spiking layer precedes it: its input is then the same at every time
    step, so applying it per step equals applying it to the time mean.
    """


class StepPad(nn.Module, base.StepModule):
    """``F.pad`` as a SpikingJelly step module (the option-A shortcut of CIFAR ResNets).

    In multi-step mode the pad is applied per time step, so a pad spec that reaches the batch
    axis is rejected rather than silently padding time.
    """

    def __init__(self, pad, mode: str = "constant", value: Optional[float] = None, step_mode: str = "s"):
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.mode = mode
        self.value = value
        self.step_mode = step_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return functional.seq_to_ann_forward(x, self._pad)
        return self._pad(x)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        # Checked on tensors only: traced inside an ANN it becomes F.pad, which canonicalisation
        # turns back into a StepPad.
        if torch.is_tensor(x) and len(self.pad) // 2 >= x.dim():
            raise ValueError(f"StepPad{self.pad} would pad the batch axis of a rank-{x.dim()} tensor")
        return F.pad(x, self.pad, mode=self.mode, value=self.value)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}, step_mode={self.step_mode}"
