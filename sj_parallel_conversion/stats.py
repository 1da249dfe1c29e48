"""Spike and energy statistics of converted models, from a spike-level run.

* per neuron layer: spikes per image, firing rate (spikes / (neurons * T));
* per synaptic layer (conv / linear): synaptic operations (SOPs) per image, counted exactly as
  the number of (input spike, connected synapse) pairs, and the ANN's multiply-accumulates
  (MACs) per image for the same layer;
* an energy estimate with the 45 nm figures of Horowitz (ISSCC 2014) that the SNN literature
  uses: 4.6 pJ per 32-bit float MAC, 0.9 pJ per 32-bit float accumulate (AC).

A synaptic layer whose input comes (through pooling, padding, reshaping, sums, concatenation)
from spiking neurons performs accumulates; one fed by the analog input image performs MACs, and
since a direct-encoded image is the same at every step its MACs are counted once.

SpikingJelly's ``op_counter.SynOpCounter`` only recognises 0/1 tensors as spikes, so it counts no
synaptic operation in a converted model whose spikes carry ``theta_post``; :func:`spike_statistics`
counts them from the graph instead.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from .fileio import save_plot
from .inference import spike_inference
from .neuron import ParallelConversionNode

__all__ = ["LayerStats", "StatsReport", "spike_statistics", "macs", "E_MAC_PJ", "E_AC_PJ"]

#: Energy of one 32-bit float multiply-accumulate in pJ (Horowitz, ISSCC 2014, 45 nm).
E_MAC_PJ = 4.6
#: Energy of one 32-bit float accumulate in pJ (Horowitz, ISSCC 2014, 45 nm).
E_AC_PJ = 0.9

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerStats:
    name: str
    kind: str  # "neuron" or "synapse"
    T: Optional[int] = None
    neurons: int = 0               # per image
    spikes_per_image: float = 0.0
    firing_rate: Optional[float] = None
    sops_per_image: float = 0.0
    macs_per_image: float = 0.0    # the ANN's MACs for this synaptic layer
    input: str = ""                # "spikes" or "analog" for synaptic layers


@dataclass
class StatsReport:
    layers: List[LayerStats] = field(default_factory=list)
    images: int = 0
    e_mac_pj: float = E_MAC_PJ
    e_ac_pj: float = E_AC_PJ

    @property
    def total_sops(self) -> float:
        return sum(l.sops_per_image for l in self.layers if l.kind == "synapse" and l.input == "spikes")

    @property
    def ann_macs(self) -> float:
        return sum(l.macs_per_image for l in self.layers if l.kind == "synapse")

    @property
    def snn_macs(self) -> float:
        return sum(l.macs_per_image for l in self.layers if l.kind == "synapse" and l.input == "analog")

    @property
    def ann_energy_uj(self) -> float:
        return self.ann_macs * self.e_mac_pj * 1e-6

    @property
    def snn_energy_uj(self) -> float:
        return (self.snn_macs * self.e_mac_pj + self.total_sops * self.e_ac_pj) * 1e-6

    @property
    def mean_firing_rate(self) -> float:
        neurons = [l for l in self.layers if l.kind == "neuron"]
        total = sum(l.neurons * l.T for l in neurons)
        return sum(l.spikes_per_image for l in neurons) / total if total else 0.0

    def to_text(self) -> str:
        from tabulate import tabulate

        rows = []
        for l in self.layers:
            if l.kind == "neuron":
                rows.append([l.name, "neuron", l.T, l.neurons, f"{l.spikes_per_image:.0f}", f"{l.firing_rate:.4f}", "", ""])
            else:
                rows.append([l.name, f"synapse ({l.input})", "", "", "", "",
                             f"{l.sops_per_image:.3g}" if l.input == "spikes" else "-", f"{l.macs_per_image:.3g}"])
        table = tabulate(rows, headers=["layer", "kind", "T", "neurons", "spikes/img", "rate", "SOPs/img",
                                        "ANN MACs/img"], tablefmt="github")
        summary = (f"\n{self.images} images; mean firing rate {self.mean_firing_rate:.4f}; "
                   f"SNN: {self.total_sops:.3g} SOPs + {self.snn_macs:.3g} MACs per image; "
                   f"ANN: {self.ann_macs:.3g} MACs per image\n"
                   f"energy per image (45 nm, {self.e_mac_pj} pJ/MAC, {self.e_ac_pj} pJ/AC, Horowitz 2014): "
                   f"SNN {self.snn_energy_uj:.2f} uJ vs ANN {self.ann_energy_uj:.2f} uJ "
                   f"(ratio {self.snn_energy_uj / self.ann_energy_uj if self.ann_energy_uj else float('nan'):.3f})")
        return table + summary

    def as_dict(self) -> Dict:
        return {"images": self.images, "layers": [asdict(l) for l in self.layers], "total_sops": self.total_sops,
                "ann_macs": self.ann_macs, "snn_macs": self.snn_macs, "ann_energy_uj": self.ann_energy_uj,
                "snn_energy_uj": self.snn_energy_uj, "mean_firing_rate": self.mean_firing_rate,
                "e_mac_pj": self.e_mac_pj, "e_ac_pj": self.e_ac_pj}

    def plot(self, path: str) -> str:
        """Per-layer firing rates and SOPs vs ANN MACs, saved as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        neurons = [l for l in self.layers if l.kind == "neuron"]
        syn = [l for l in self.layers if l.kind == "synapse"]
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
        a.bar(range(len(neurons)), [l.firing_rate for l in neurons], color="tab:orange")
        a.set_xticks(range(len(neurons)), [l.name for l in neurons], rotation=75, fontsize=7)
        a.set_ylabel("firing rate (spikes / neuron / step)")
        a.set_title("per-layer firing rate")
        xs = range(len(syn))
        b.bar([i - 0.2 for i in xs], [l.macs_per_image for l in syn], width=0.4, label="ANN MACs")
        b.bar([i + 0.2 for i in xs], [l.sops_per_image if l.input == "spikes" else l.macs_per_image for l in syn],
              width=0.4, label="SNN SOPs (MACs for analog input)")
        b.set_xticks(list(xs), [l.name for l in syn], rotation=75, fontsize=7)
        b.set_yscale("log")
        b.set_title("per-layer operations per image")
        b.legend(fontsize=8)
        save_plot(fig, path)
        return path


def _spike_driven(gm: nn.Module) -> Dict[str, bool]:
    """For each synaptic module of a converted GraphModule: does its input come from spikes?"""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError("spike_statistics needs a model converted by ParallelConverter (an fx.GraphModule)")
    modules = dict(gm.named_modules())
    memo: Dict[fx.Node, bool] = {}

    def from_spikes(node) -> bool:
        if not isinstance(node, fx.Node):
            return True  # constants (pad values, shapes) carry no analog input
        if node in memo:
            return memo[node]
        if node.op == "placeholder":
            res = False
        elif node.op == "call_module" and isinstance(modules.get(node.target), ParallelConversionNode):
            res = True
        elif node.op == "call_module" and isinstance(modules.get(node.target), _SYNAPTIC):
            res = False  # currents, not spikes
        else:
            srcs = [a for a in node.all_input_nodes]
            res = bool(srcs) and all(from_spikes(a) for a in srcs)
        memo[node] = res
        return res

    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), _SYNAPTIC):
            out[node.target] = from_spikes(node.args[0])
    return out


def _events_fanout(module: nn.Module, x: torch.Tensor) -> float:
    """Synaptic events for input ``x`` ([T*N, ...]): each nonzero input times its fan-out."""
    active = (x != 0).to(torch.float32)
    if isinstance(module, nn.Linear):
        return float(active.sum()) * module.out_features
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[active.dim() - 2]
    g = module.groups
    ones = torch.ones((g, module.in_channels // g) + tuple(module.kernel_size), device=x.device)
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError(f"SOP counting supports zero-padded convolutions with numeric padding, not {module}")
    occupancy = conv(active, ones, None, module.stride, module.padding, module.dilation, g)
    return float(occupancy.sum(dtype=torch.float64)) * (module.out_channels // g)


def macs(module: nn.Module, out: torch.Tensor, per: int = 1) -> float:
    """Multiply-accumulates of a conv or linear ``module`` that produced ``out``, divided by ``per``
    (e.g. images x time steps): one per output value and input it is connected to."""
    if isinstance(module, nn.Linear):
        return float(module.in_features * (out.numel() // out.shape[-1]) * module.out_features / per)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return float(out.numel() * (math.prod(module.kernel_size) * module.in_channels // module.groups) / per)
    raise TypeError(f"MACs are defined for Conv1d/2d/3d and Linear, got {type(module).__name__}")


@torch.no_grad()
def spike_statistics(model: nn.Module, x: torch.Tensor, T: Optional[int] = None,
                     e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ) -> StatsReport:
    """Run ``model`` at spike level on static images ``x`` ``[N, ...]`` and collect statistics."""
    spike_in = _spike_driven(model)
    n = x.shape[0]
    stats: Dict[str, LayerStats] = {}
    order: List[str] = []
    hooks = []

    for name, m in model.named_modules():
        if isinstance(m, ParallelConversionNode):
            def hook(mod, inp, out, name=name):
                s = stats.setdefault(name, LayerStats(name, "neuron", T=mod.T))
                if name not in order:
                    order.append(name)
                s.neurons = out[0].numel() // n
                s.spikes_per_image += float((out != 0).sum()) / n
                s.firing_rate = s.spikes_per_image / (s.neurons * mod.T)
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, _SYNAPTIC):
            def hook(mod, inp, out, name=name):
                xin = inp[0]
                steps = xin.shape[0] if getattr(mod, "step_mode", "s") == "m" else 1
                flat = xin.flatten(0, 1) if steps > 1 or getattr(mod, "step_mode", "s") == "m" else xin
                s = stats.setdefault(name, LayerStats(name, "synapse"))
                if name not in order:
                    order.append(name)
                s.input = "spikes" if spike_in.get(name, False) else "analog"
                s.macs_per_image = macs(mod, out, n * steps)
                if s.input == "spikes":
                    s.sops_per_image += _events_fanout(mod, flat) / n
            hooks.append(m.register_forward_hook(hook))
    try:
        spike_inference(model, x, T)
    finally:
        for h in hooks:
            h.remove()
    return StatsReport([stats[k] for k in order], n, e_mac_pj, e_ac_pj)
