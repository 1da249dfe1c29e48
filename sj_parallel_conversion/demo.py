"""The README's main job: train two tiny CNNs on scikit-learn's 8x8 digits, convert them three ways
and print the comparison table (no download, about a minute on 2 CPU cores).

1. a QCFS CNN (L = 4) converted at T = L: lossless, no calibration data;
2. a ReLU CNN converted training-free (max recording + DA-QCFS calibration) at several T;
3. the same ReLU CNN through SpikingJelly's own IF-neuron converters at the same T.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from . import data, models
from .fileio import write_text
from .compare import ComparisonRow, ComparisonTable, compare_converters, evaluate
from .inference import count_inference, spike_inference
from .recipe import ParallelConverter
from .training import train_classifier

__all__ = ["run_demo"]


def run_demo(out_dir: str = "runs/demo", T_list: Sequence[int] = (2, 4, 8, 16, 32), epochs: int = 15,
             seed: int = 0, progress: bool = True, L: int = 4) -> ComparisonTable:
    """Train, convert, compare; write ``table.md``, ``table.json`` and ``accuracy_speed.png``."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    train_set, test_set = data.digits("train"), data.digits("test")
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    calib = DataLoader(train_set, batch_size=128)
    test = DataLoader(test_set, batch_size=256)

    def log(msg):
        print(f"[demo {time.perf_counter() - t_start:5.1f}s] {msg}", flush=True)

    log(f"digits: {len(train_set)} training and {len(test_set)} test images of 8x8 pixels")
    qcfs_ann = models.build_model("digits_cnn", num_classes=10, in_channels=1, act="qcfs", L=L, theta=2.0)
    train_classifier(qcfs_ann, train, epochs, lr=0.05, progress=progress)
    relu_ann = models.build_model("digits_cnn", num_classes=10, in_channels=1, act="relu")
    train_classifier(relu_ann, train, epochs, lr=0.05, progress=progress)
    log(f"trained a QCFS (L={L}) and a ReLU CNN for {epochs} epochs each")

    # 1. QCFS, T == L: lossless.
    snn = ParallelConverter("parallel", T=L, progress=False).convert(qcfs_ann)
    x = torch.cat([b[0] for b in test])
    with torch.no_grad():
        ann_pred = qcfs_ann(x).argmax(1)
    snn_pred = spike_inference(snn, x).mean(0).argmax(1)
    diff = int((ann_pred != snn_pred).sum())
    log(f"QCFS ANN -> parallel SNN at T = L = {L}: {diff} of {len(x)} test predictions differ from the ANN")
    table = ComparisonTable(title=f"8x8 digits, {len(test_set)} test images")
    acc, n, sec = evaluate(qcfs_ann, test, progress=False)
    table.rows.append(ComparisonRow("qcfs-ann", None, acc, n, 0.0, sec))
    acc, n, sec = evaluate(lambda b: spike_inference(snn, b).mean(0), test, progress=False)
    table.rows.append(ComparisonRow("qcfs-parallel", L, acc, n, 0.0, sec))

    # 2 + 3. ReLU network: training-free parallel conversion vs SpikingJelly's IF converters.
    relu_table = compare_converters(relu_ann, calib, test, list(T_list), progress=False)
    table.rows.extend(relu_table.rows)
    log("converted the ReLU CNN with the parallel recipe and with SpikingJelly's RateCoding and LTB recipes")

    print()
    print(table.to_text())
    print()
    table.to_json(os.path.join(out_dir, "table.json"))
    write_text(os.path.join(out_dir, "table.md"), table.to_text() + "\n")
    plot = table.plot(os.path.join(out_dir, "accuracy_speed.png"))
    log(f"wrote {os.path.join(out_dir, 'table.md')}, table.json and the plot {plot}")
    return table
