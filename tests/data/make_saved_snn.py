"""Writes ``saved_snn_v2.pt`` and ``saved_snn_v2_io.pt``: a converted network saved by save_snn, and
an input with the network's spike-level output, kept so that later versions are tested against a
file an earlier one wrote (``tests/test_patterns.py``).

The committed files were written by the package as of commit 374176a (before the module-pattern
table); running this script again overwrites them with the current version's output, which
defeats their purpose, so do that only when the file format changes on purpose.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from sj_parallel_conversion import (NetworkSettings, ParallelConversionRecipe, ParallelConverter, save_snn,
                                    spike_inference)

HERE = os.path.dirname(os.path.abspath(__file__))


class EveryStepModule(nn.Module):
    """One of each module the conversion writes: AnalogReLU, StepPad, ConstantScale, ChunkPart,
    TimeMean (per-layer T), SpikingJelly's layers and tensor ops, the parallel neuron."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.relu3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        h = self.pool(self.relu2(self.conv2(F.pad(h, (1, 1, 1, 1))) * 0.5))
        a, b = h.chunk(2, dim=1)
        h = torch.cat([a, self.relu3(self.conv3(b) / 2.0)], dim=1) + h
        h = F.avg_pool2d(h, 2)
        return self.fc(self.drop(h.view(h.size(0), -1)))


def main() -> None:
    torch.manual_seed(0)
    ann = EveryStepModule().eval()
    x = torch.rand(6, 3, 10, 10)
    recipe = ParallelConversionRecipe({"relu2": 4, "relu3": 8}, [x], progress=False, method="ema", default_T=4,
                                      network=NetworkSettings(analog_sites=["relu1"]))
    snn = ParallelConverter(recipe).convert(ann)
    save_snn(snn, os.path.join(HERE, "saved_snn_v2.pt"), metadata={"T": 4, "written_by": "374176a"})
    probe = torch.rand(3, 3, 10, 10)
    torch.save({"x": probe, "spikes": spike_inference(snn, probe)}, os.path.join(HERE, "saved_snn_v2_io.pt"))


if __name__ == "__main__":
    main()
