"""From IF conversion to parallel conversion: one small CNN, two SpikingJelly converters.

The script behind the tutorial page ``docs/tutorial_if_to_parallel.rst``. It trains a small ReLU
CNN on scikit-learn's 8x8 digits, converts it with SpikingJelly's ``RateCodingRecipe`` (IF
neurons) and with ``ParallelConversionRecipe`` (parallel conversion neurons), and shows what
changes for a SpikingJelly user. Run it from the repository root::

    python docs/tutorial_if_to_parallel.py

It needs no download and prints its own running time at the end (21 s on one core of a 2-core
CPU shared with other jobs).
"""
from __future__ import annotations

import copy
import io
import time

START = time.perf_counter()

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from spikingjelly.activation_based import ann2snn, functional, monitor, neuron

from sj_parallel_conversion import (
    CalibrationSettings,
    ParallelConversionNode,
    ParallelConversionRecipe,
    count_domain_model,
    count_inference,
    parallel_neuron_factory,
    spike_inference,
)

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: one thread is fastest (more threads only add overhead)
T_LIST = (2, 4, 8, 16, 32)

# [data] ---------------------------------------------------------------------------------------
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
labels = torch.tensor(digits.target, dtype=torch.int64)
order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
images, labels = images[order], labels[order]
x_train, y_train = images[:1400], labels[:1400]
x_test, y_test = images[1400:], labels[1400:]
mean, std = x_train.mean(), x_train.std()
x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
# Both recipes accept any iterable of batches: tensors, (x, y) pairs or dicts.
calib_loader = [x_train[i:i + 128] for i in range(0, len(x_train), 128)]
# [/data]

# [model] --------------------------------------------------------------------------------------
ann = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.MaxPool2d(2),                       # after the activation: exact on sorted spike trains
    nn.Flatten(),
    nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
    nn.Linear(64, 10),
)
opt = torch.optim.Adam(ann.parameters(), lr=3e-3)
for epoch in range(12):
    ann.train()
    for i in torch.randperm(len(x_train)).split(64):
        loss = F.cross_entropy(ann(x_train[i]), y_train[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
ann.eval()


def accuracy(logits: torch.Tensor) -> float:
    return (logits.argmax(-1) == y_test).float().mean().item()


with torch.no_grad():
    ann_acc = accuracy(ann(x_test))
print(f"ReLU ANN test accuracy: {100 * ann_acc:.2f}% on {len(x_test)} images")
# [/model]

# [if-convert] ---------------------------------------------------------------------------------
# SpikingJelly's own converter: ReLU -> VoltageScaler(1/s) -> IFNode -> VoltageScaler(s), in its
# strongest setting: one threshold per channel (99.9th percentile of the activations) and membrane
# potentials that start at half the threshold.
if_snn = ann2snn.Converter(ann2snn.RateCodingRecipe(calib_loader, mode="99.9%", channel_wise=True,
                                                    half_threshold=True)).convert(copy.deepcopy(ann))
functional.set_step_mode(if_snn, "m")         # feed [T, N, ...] sequences


def run_if(T: int) -> torch.Tensor:
    functional.reset_net(if_snn)              # IF neurons keep membrane potentials between calls
    with torch.no_grad():
        return if_snn(x_test.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)
# [/if-convert]


# [pc-convert] ---------------------------------------------------------------------------------
# Parallel conversion: one converted model per T (calibration depends on T). method="ema" asks
# for the paper's Algorithm 1 (seconds); the default, method="auto", also fits a learned
# calibration and keeps whichever candidate agrees best with the ANN (see [auto] below).
pc_snns = {}
for T in T_LIST:
    recipe = ParallelConversionRecipe(T, calib_loader, progress=False, method="ema")
    pc_snns[T] = ann2snn.Converter(recipe).convert(copy.deepcopy(ann))
print(f"conversion case chosen by the recipe: {recipe.case}")
for T in T_LIST:
    print(f"  T={T:2d}: {pc_snns[T].calibration_report}")   # what the recipe did, kept on the model
# [/pc-convert]

# [compare] ------------------------------------------------------------------------------------
rows = []
for T in T_LIST:
    t0 = time.perf_counter()
    acc_if = accuracy(run_if(T))
    t_if = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc_spike = accuracy(spike_inference(pc_snns[T], x_test).mean(0))   # [T, N, 10] -> mean
    t_spike = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc_count = accuracy(count_inference(pc_snns[T], x_test))            # one pass, [N, 10]
    t_count = time.perf_counter() - t0
    rows.append((T, acc_if, acc_spike, acc_count, t_if, t_spike, t_count))

print()
print(f"comparison on {len(x_test)} test digits (ReLU ANN: {100 * ann_acc:.2f}%)")
print("|  T | IF (RateCodingRecipe, channel-wise, half threshold) | parallel, spike-level | parallel, count-domain "
      "| IF ms | spike ms | count ms |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for T, a, b, c, ta, tb, tc in rows:
    print(f"| {T:2d} | {100 * a:6.2f}% | {100 * b:6.2f}% | {100 * c:6.2f}% "
          f"| {1e3 * ta:6.1f} | {1e3 * tb:6.1f} | {1e3 * tc:6.1f} |")
print()
# [/compare]

# [neurons] ------------------------------------------------------------------------------------
T = 8
snn = pc_snns[T]
IF_TYPES = (neuron.IFNode, neuron.HalfThresholdIFNode)   # half_threshold=True uses the latter
if_nodes = [n for n, m in if_snn.named_modules() if isinstance(m, IF_TYPES)]
pc_nodes = [(n, m) for n, m in snn.named_modules() if isinstance(m, ParallelConversionNode)]
print(f"IF model: {len(if_nodes)} IF neuron layers, e.g. {if_nodes[0]!r}")
for name, node in pc_nodes:
    print(f"parallel model: {name}: {node}")
# [/neurons]

# [sorted] -------------------------------------------------------------------------------------
x_few = x_test[:4]
mon_pc = monitor.OutputMonitor(snn, ParallelConversionNode)
spike_inference(snn, x_few)
trains = mon_pc.records[0]                       # first layer, [T, N, C, H, W]
mon_pc.remove_hooks()
spikes = (trains != 0).flatten(1).T.int()        # one row per neuron: its T-step train
counts = spikes.sum(1)
sorted_ok = torch.equal(spikes, (torch.arange(T) >= T - counts[:, None]).int())
print(f"parallel neuron trains are sorted (0...0 1...1): {sorted_ok}")
examples = [spikes[counts == k][0] for k in range(0, T + 1, 2) if bool((counts == k).any())]
print("  parallel trains with 0, 2, 4, ... spikes:", [''.join(map(str, r.tolist())) for r in examples])

mon_if = monitor.OutputMonitor(if_snn, IF_TYPES)
functional.reset_net(if_snn)
with torch.no_grad():
    if_snn(x_few.unsqueeze(0).repeat(T, 1, 1, 1, 1))
if_spikes = (mon_if.records[0] != 0).flatten(1).T.int()
mon_if.remove_hooks()
functional.reset_net(if_snn)
busy = if_spikes[(if_spikes.sum(1) > 0) & (if_spikes.sum(1) < T)]
print("  a few IF trains:                        ", [''.join(map(str, r.tolist())) for r in busy[:5]])
# [/sorted]

# [state] --------------------------------------------------------------------------------------
# reset_net is harmless but unnecessary: the parallel neuron keeps no state between calls.
a = spike_inference(snn, x_few)
b = snn(x_few.unsqueeze(0).repeat(T, 1, 1, 1, 1))     # no reset in between
print(f"parallel model, two calls without reset_net give equal outputs: {torch.equal(a, b)}")
with torch.no_grad():
    first = if_snn(x_few.unsqueeze(0).repeat(T, 1, 1, 1, 1))
    second = if_snn(x_few.unsqueeze(0).repeat(T, 1, 1, 1, 1))   # membrane potentials carried over
functional.reset_net(if_snn)
print(f"IF model, two calls without reset_net give equal outputs:       {torch.equal(first, second)}")

# Single-step mode has no meaning for a neuron that needs all T input steps at once.
try:
    functional.set_step_mode(snn, "s")
except ValueError as exc:
    print(f"single-step mode refused: {str(exc)[:72]}...")
# The converted model's root checks every module first: the refusal switched none of them.

# Count domain: a separate one-pass module; its output is the time mean of the spike-level run
# (up to float rounding).
counted = count_domain_model(snn)
with torch.no_grad():
    diff = (counted(x_test) - spike_inference(snn, x_test).mean(0)).abs().max().item()
print(f"max |count-domain - spike-level mean| over all logits: {diff:.2e}")
# [/state]

# [factory] ------------------------------------------------------------------------------------
# Drop-in: SpikingJelly's RateCodingRecipe with the parallel neuron instead of IFNode.
drop_in = ann2snn.Converter(ann2snn.RateCodingRecipe(
    calib_loader, mode="max", channel_wise=True, neuron_factory=parallel_neuron_factory(T))).convert(copy.deepcopy(ann))
functional.set_step_mode(drop_in, "m")
acc_drop_in = accuracy(spike_inference(drop_in, x_test, T).mean(0))
# The same recipe with calibration switched off: the maxima, no Algorithm 1 (report: None).
no_calib = ann2snn.Converter(ParallelConversionRecipe(T, calib_loader, progress=False,
                                                      calibration=CalibrationSettings(calibrate=False))).convert(
    copy.deepcopy(ann))
assert no_calib.calibration_report is None and snn.calibration_report.method == "ema"
acc_no_calib = accuracy(count_inference(no_calib, x_test))
acc_ema = accuracy(count_inference(snn, x_test))
print(f"T={T}: RateCodingRecipe + parallel_neuron_factory {100 * acc_drop_in:.2f}%, "
      f"CalibrationSettings(calibrate=False) {100 * acc_no_calib:.2f}%, "
      f"ParallelConversionRecipe(method='ema') {100 * acc_ema:.2f}%")
# [/factory]

# [auto] ---------------------------------------------------------------------------------------
# The default method="auto" at T=2: no calibration, Algorithm 1 and a learned fit are made on part
# of the calibration images and scored on the rest; the report names the one kept.
auto = ann2snn.Converter(ParallelConversionRecipe(2, calib_loader, progress=False)).convert(copy.deepcopy(ann))
print(f"T=2, method='auto': {auto.calibration_report}")
print(f"T=2: method='auto' {100 * accuracy(count_inference(auto, x_test)):.2f}%, "
      f"method='ema' {100 * accuracy(count_inference(pc_snns[2], x_test)):.2f}%")
# [/auto]

# [save] ---------------------------------------------------------------------------------------
buffer = io.BytesIO()
torch.save(snn.state_dict(), buffer)
buffer.seek(0)
# Rebuild the structure without calibration (one batch fixes the shapes), then load the state.
rebuilt = ann2snn.Converter(ParallelConversionRecipe(T, calib_loader[:1], progress=False,
                                                     calibration=CalibrationSettings(calibrate=False))).convert(
    copy.deepcopy(ann))
rebuilt.load_state_dict(torch.load(buffer))
same = torch.equal(count_inference(rebuilt, x_test), count_inference(snn, x_test))
print(f"state_dict round trip reproduces the converted model: {same}")
# [/save]
print(f"tutorial finished in {time.perf_counter() - START:.0f} s")
