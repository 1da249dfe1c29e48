"""Spike and energy statistics of converted models, from a spike-level run.

* per neuron layer: spikes per image, firing rate (spikes / (neurons * T));
* per synaptic layer (conv / linear): synaptic operations (SOPs) per image, counted from the
  spikes: every spike a neuron emits, times the synapses of the layer it reaches (see below), and
  the ANN's multiply-accumulates (MACs) per image for the same layer;
* an energy estimate with the 45 nm figures of Horowitz (ISSCC 2014) that the SNN literature
  uses: 4.6 pJ per 32-bit float MAC, 0.9 pJ per 32-bit float accumulate (AC).

A synaptic layer whose input comes (through pooling, padding, reshaping, sums, concatenation)
from spiking neurons performs accumulates; one fed by the analog input image performs MACs, and
since a direct-encoded image is the same at every step its MACs are counted once.

Between a neuron and the synaptic layer it feeds, an input value may carry several spikes: an
average pool sums a window of them (its ``1/k`` folds into the weights), a residual sum or a
concatenation joins two trains, and a per-layer-``T`` join (:class:`~.joins.TimeMean`) gathers a
whole train into one step. Counting the nonzero inputs would count each such value once;
:func:`spike_statistics` carries, next to every value, how many spikes reach it (window sums
through average pools, sums through additions, the train's total through a time-mean join, the
same values through padding, reshaping and max pooling) and counts each spike with its fan-out.
An operation outside that list counts its nonzero outputs instead and is named in
:attr:`StatsReport.unmodelled`.

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
from spikingjelly.activation_based import functional
from torch import fx

from . import patterns
from .fileio import save_plot
from .inference import repeat_input
from .multistep import step_tensor_op_type
from .neuron import ParallelConversionNode

__all__ = ["LayerStats", "StatsReport", "spike_statistics", "macs", "E_MAC_PJ", "E_AC_PJ"]

#: Energy of one 32-bit float multiply-accumulate in pJ (Horowitz, ISSCC 2014, 45 nm).
E_MAC_PJ = 4.6
#: Energy of one 32-bit float accumulate in pJ (Horowitz, ISSCC 2014, 45 nm).
E_AC_PJ = 0.9

# The layers whose synaptic operations are counted from spikes (the pattern table's ``spikes``).
_SYNAPTIC = patterns.module_types(lambda p: p.spikes == patterns.SYNAPSE)


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
    #: Operations between neurons and synapses whose spikes were counted as nonzero values (see
    #: the module docstring); empty for the graphs the converter builds from supported layers.
    unmodelled: List[str] = field(default_factory=list)

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
        if self.unmodelled:
            summary += ("\nSOPs after " + ", ".join(self.unmodelled) + " count nonzero values, not spikes "
                        "(a lower bound)")
        return table + summary

    def as_dict(self) -> Dict:
        return {"images": self.images, "layers": [asdict(l) for l in self.layers], "total_sops": self.total_sops,
                "ann_macs": self.ann_macs, "snn_macs": self.snn_macs, "ann_energy_uj": self.ann_energy_uj,
                "snn_energy_uj": self.snn_energy_uj, "mean_firing_rate": self.mean_firing_rate,
                "e_mac_pj": self.e_mac_pj, "e_ac_pj": self.e_ac_pj, "unmodelled": list(self.unmodelled)}

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


def _events_fanout(module: nn.Module, spikes: torch.Tensor) -> float:
    """Synaptic events of ``module`` whose input entries receive ``spikes`` ([T*N, ...]) spikes each:
    every spike times the fan-out of the entry it arrives at."""
    active = spikes.to(torch.float32)
    if isinstance(module, nn.Linear):
        return float(active.sum()) * module.out_features
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[active.dim() - 2]
    g = module.groups
    ones = torch.ones((g, module.in_channels // g) + tuple(module.kernel_size), device=spikes.device)
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


def _flow(spikes: str) -> set:
    """Function targets and method names through which the table says spikes flow so."""
    return set(patterns.function_targets(lambda p: p.spikes == spikes))


_SUMS, _SAME, _SHAPES, _MEANS = _flow(patterns.SUM), _flow(patterns.SAME), _flow(patterns.MOVE), _flow(patterns.MEAN)


def _window_sums(mod: nn.Module, counts: torch.Tensor) -> torch.Tensor:
    """The spikes an average pool gathers in each window (its ``1/k`` folds into the next weights)."""
    multi = getattr(mod, "step_mode", "s") == "m"
    x = counts.flatten(0, 1) if multi else counts
    if isinstance(mod, (nn.AvgPool2d, nn.AvgPool3d)):
        pool = F.avg_pool2d if isinstance(mod, nn.AvgPool2d) else F.avg_pool3d
        out = pool(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, True, divisor_override=1)
    elif isinstance(mod, nn.AvgPool1d):
        k = mod.kernel_size[0]
        out = F.avg_pool1d(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, True) * k
    else:
        out = _adaptive_sums(mod, x)
    return out.unflatten(0, counts.shape[:2]) if multi else out


def _adaptive_sums(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Bin sums of an adaptive average pool: its means times each bin's size."""
    dims = 1 if isinstance(mod, nn.AdaptiveAvgPool1d) else 2 if isinstance(mod, nn.AdaptiveAvgPool2d) else 3
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
    mean = pool(x, mod.output_size)
    size = None
    for n_in, n_out in zip(x.shape[-dims:], mean.shape[-dims:]):
        j = torch.arange(n_out)
        # torch's bin j covers [floor(j * in / out), ceil((j + 1) * in / out))
        width = (-((-(j + 1) * n_in) // n_out) - (j * n_in) // n_out).to(x)
        size = width if size is None else size.unsqueeze(-1) * width
    return mean * size


class _SpikeCounter(fx.Interpreter):
    """Runs a converted graph and carries, next to every value that comes from spikes, how many
    spikes reach each of its entries (``counts``); a synaptic layer fed by spikes reports its
    counts to ``on_synapse(name, module, counts)``."""

    def __init__(self, gm: fx.GraphModule, spike_in: Dict[str, bool], on_synapse):
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.spike_in = spike_in
        self.on_synapse = on_synapse
        self.counts: Dict[fx.Node, Optional[torch.Tensor]] = {}
        self.unmodelled: List[str] = []

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        counts = self._count(n, out) if torch.is_tensor(out) else None
        if counts is not None and counts.shape != out.shape:
            counts = self._nonzero(n, out)
        self.counts[n] = counts
        for dead in self.user_to_last_uses.get(n, []):  # as the interpreter frees values
            self.counts.pop(dead, None)
        return out

    def _nonzero(self, n: fx.Node, out: torch.Tensor) -> torch.Tensor:
        what = f"{n.op} {n.target if isinstance(n.target, str) else getattr(n.target, '__name__', n.target)}"
        if n.op == "call_module":
            what = f"{type(self.modules[n.target]).__name__} {n.target}"
        if what not in self.unmodelled:
            self.unmodelled.append(what)
        return (out != 0).to(torch.float32)

    def _count(self, n: fx.Node, out: torch.Tensor) -> Optional[torch.Tensor]:
        inputs = {a: self.counts.get(a) for a in n.all_input_nodes}
        if n.op == "call_module":
            mod = self.modules[n.target]
            if isinstance(mod, ParallelConversionNode):
                return (out != 0).to(torch.float32)
            first = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            counts = inputs.get(first)
            pattern = patterns.module_pattern(mod)
            flow = pattern.spikes if pattern is not None else None
            if flow == patterns.SYNAPSE:
                if counts is not None and self.spike_in.get(n.target, False):
                    multi = getattr(mod, "step_mode", "s") == "m"
                    self.on_synapse(n.target, mod, counts.flatten(0, 1) if multi else counts)
                return None  # currents
            if counts is None:
                return None
            if flow == patterns.TRAIN:
                return counts.sum(0, keepdim=True)  # every spike of the train, in its one step
            if flow == patterns.WINDOW:
                return _window_sums(mod, counts)
            if flow == patterns.SAME and not (pattern.role == "identity" and pattern.module is not nn.Identity
                                              and mod.training):
                return counts  # a per-channel scale and shift moves no spike (dropout: in eval mode)
            if flow == patterns.PAD:
                return F.pad(counts, mod.pad)  # padded entries carry no spike, whatever their value
            if flow == patterns.MOVE:
                return mod(counts)  # a max of sorted trains passes one train; the rest only move entries
            if type(mod) is step_tensor_op_type():  # SpikingJelly's step-mode form of a tensor op
                return self._tensor_op(n, mod, inputs)
            return self._nonzero(n, out)
        if n.op not in ("call_function", "call_method") or all(c is None for c in inputs.values()):
            return None
        target = n.target
        if target in _SUMS:
            total = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            for c in inputs.values():
                if c is not None:
                    total += c  # spikes of both operands reach the sum
            return total
        if target in _SAME:
            return next(c for c in inputs.values() if c is not None)
        if target is torch.cat:
            parts = [self.counts.get(a) if self.counts.get(a) is not None
                     else torch.zeros(self.env[a].shape, dtype=torch.float32, device=out.device)
                     for a in n.args[0]]
            return torch.cat(parts, *n.args[1:], **n.kwargs)
        if target in _SHAPES or target in _MEANS:
            def value(a):
                c = inputs.get(a)
                return c if c is not None else self.env[a]
            args = fx.node.map_arg(n.args, value)
            kwargs = fx.node.map_arg(n.kwargs, value)
            res = getattr(args[0], target)(*args[1:], **kwargs) if isinstance(target, str) else target(*args, **kwargs)
            if target in _MEANS:  # a mean of spikes is their sum, scaled into the next weights
                res = res * (args[0].numel() / max(1, res.numel()))
            return res
        return self._nonzero(n, out)

    def _tensor_op(self, n: fx.Node, mod: nn.Module, inputs) -> Optional[torch.Tensor]:
        """The same op on the counts: shape ops move them, ``cat`` joins them, ``mean`` sums them."""
        op = getattr(mod, "op_name", None)
        if op not in ("mean", "flatten", "transpose", "unsqueeze", "unflatten", "permute", "cat", "reshape",
                      "expand", "getitem"):
            return self._nonzero(n, self.env[n]) if torch.is_tensor(self.env.get(n)) else None

        def arg(a):
            if not isinstance(a, fx.Node):
                return a
            if inputs.get(a) is not None:
                return inputs[a]
            value = self.env[a]
            return torch.zeros(value.shape, device=value.device) if op == "cat" and torch.is_tensor(value) else value
        args = [arg(a) for a in n.args]
        res = mod(*args, **{k: arg(v) for k, v in n.kwargs.items()})
        if op == "mean":  # a mean of spikes is their sum, scaled into the next weights
            res = res * (args[0].numel() / max(1, res.numel()))
        return res


@torch.no_grad()
def spike_statistics(model: nn.Module, x: torch.Tensor, T: Optional[int] = None,
                     e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ) -> StatsReport:
    """Run ``model`` at spike level on static images ``x`` ``[N, ...]`` and collect statistics.

    ``T=None`` feeds each image once (parallel networks, as :func:`~.spike_inference` does); an
    int repeats it ``T`` times. SOPs count every spike with the fan-out of each synaptic entry it
    reaches (the module docstring says how pooling, sums and time-mean joins pass spikes on)."""
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
                steps = inp[0].shape[0] if getattr(mod, "step_mode", "s") == "m" else 1
                s = stats.setdefault(name, LayerStats(name, "synapse"))
                if name not in order:
                    order.append(name)
                s.input = "spikes" if spike_in.get(name, False) else "analog"
                s.macs_per_image = macs(mod, out, n * steps)
            hooks.append(m.register_forward_hook(hook))

    def on_synapse(name: str, module: nn.Module, counts: torch.Tensor) -> None:
        stats[name].sops_per_image += _events_fanout(module, counts) / n

    if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
        raise ValueError(f"T must be None or an integer >= 1, got {T!r}")
    counter = _SpikeCounter(model, spike_in, on_synapse)
    functional.reset_net(model)
    try:
        counter.run(repeat_input(x, 1 if T is None else T))
    finally:
        functional.reset_net(model)
        for h in hooks:
            h.remove()
    return StatsReport([stats[k] for k in order], n, e_mac_pj, e_ac_pj, unmodelled=counter.unmodelled)
