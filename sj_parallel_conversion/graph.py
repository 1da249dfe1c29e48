"""FX graph rewriting for parallel conversion.

:func:`prepare_graph` turns a traced ANN into a canonical graph in which

* every activation call site is its own ``call_module`` node (``nn.ReLU`` / ``F.relu`` /
  ``torch.relu`` / ``clamp(min=0)`` become :class:`nn.ReLU`; ``nn.ReLU6`` / ``clamp(0, c)`` /
  ``hardtanh(0, c)`` become :class:`~sj_parallel_conversion.ClipReLU`; a module called twice is
  copied so that each call gets its own neuron);
* functional pools, padding and dropout are modules the step-mode adapter understands;
* a max pool placed before an activation is moved after it (exact on the ANN side, since the
  activations are monotone, and exact on sorted spike trains, which pooling of currents is not);
* anything that does not commute with the time mean is rejected, before calibration starts,
  with an error naming the graph node and the module it came from.
"""
from __future__ import annotations

import builtins
import copy
import math
import operator
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import base, functional
from torch import fx

from .activation import DAQCFS, QCFS, ClipReLU

__all__ = [
    "GraphConversionError",
    "StepPad",
    "activation_sites",
    "is_activation_site",
    "prepare_graph",
]

ACTIVATION_TYPES = (nn.ReLU, ClipReLU, QCFS, DAQCFS)

_LINEAR_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity,
)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_PASS_FUNCTIONS = {
    operator.add, torch.add, operator.sub, torch.sub, operator.neg, torch.neg,
    operator.getitem, torch.cat, torch.flatten, torch.reshape, torch.mean,
    builtins.getattr, torch.transpose, torch.unsqueeze,
}
_PASS_METHODS = {"view", "reshape", "flatten", "size", "mean", "dim", "permute", "transpose",
                 "unsqueeze", "unflatten", "expand"}


class GraphConversionError(ValueError):
    """A graph pattern that parallel conversion cannot handle exactly."""


class AnalogReLU(nn.ReLU):
    """A ReLU kept analog in the converted network (the paper keeps ImageNet ResNets' stem so).

    Only allowed where no spiking layer precedes it: its input is then the same at every time
    step, so applying it per step equals applying it to the time mean.
    """


def keep_analog(gm: fx.GraphModule, names) -> fx.GraphModule:
    """Turn the ReLU sites ``names`` into :class:`AnalogReLU` after checking nothing spikes before them."""
    names = list(names)
    modules = dict(gm.named_modules())
    sites = {n.target: n for n in activation_sites(gm)}
    for name in names:
        if name not in sites:
            raise ValueError(f"analog site {name!r} is not an activation site; sites are {sorted(sites)}")
        if type(modules[name]) is not nn.ReLU:
            raise ValueError(f"analog site {name!r} is a {type(modules[name]).__name__}; only ReLU sites can stay analog")
        stack, seen = list(sites[name].all_input_nodes), set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.op == "call_module" and node.target in sites and node.target not in names:
                raise GraphConversionError(
                    f"activation site {name!r} cannot stay analog: spiking site {node.target!r} precedes it, so "
                    "its input changes over time")
            stack.extend(node.all_input_nodes)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, AnalogReLU())
    return gm


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
        if len(self.pad) // 2 >= x.dim():
            raise ValueError(f"StepPad{self.pad} would pad the batch axis of a rank-{x.dim()} tensor")
        return F.pad(x, self.pad, mode=self.mode, value=self.value)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode}, step_mode={self.step_mode}"


def is_activation_site(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """True for a ``call_module`` node whose module is one of the convertible activations."""
    m = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(m, ACTIVATION_TYPES) and not isinstance(m, AnalogReLU)


def activation_sites(gm: fx.GraphModule) -> List[fx.Node]:
    """Activation call sites in execution (topological) order."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if is_activation_site(n, modules)]


def describe(node: fx.Node) -> str:
    """'graph node X (op target) from module Y' for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = None
    if stack:
        path, (_, cls) = list(stack.items())[-1]
        owner = f"{path.split('@')[0] or '<root>'} ({getattr(cls, '__name__', cls)})"
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    where = f" in module {owner}" if owner else ""
    return f"graph node '{node.name}' ({node.op} {tgt}){where}"


def prepare_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Canonicalise activation sites, module-ise functional ops, reorder pools, then validate."""
    _canonicalise(gm)
    _move_maxpools_after_activations(gm)
    validate_graph(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # Dry-run SpikingJelly's step-mode adapter on a copy so that its rejections, too, come
    # before any calibration work.
    try:
        to_multistep(copy.deepcopy(gm))
    except (ValueError, TypeError) as exc:
        raise GraphConversionError(f"SpikingJelly's step-mode adapter rejects this model: {exc}") from exc
    return gm


def to_multistep(gm: fx.GraphModule) -> fx.GraphModule:
    """Wrap stateless layers as SpikingJelly step modules (SpikingJelly's own adapter)."""
    from spikingjelly.activation_based.ann2snn.recipes.step_mode_adapters import adapt_step_mode_graph

    # The torch layers that have a SpikingJelly step-module twin in ``layer`` (the adapter
    # swaps each for its twin); our own table, so no SpikingJelly internals are read.
    stateless = (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
        nn.Linear, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.Upsample,
        nn.Flatten, nn.Dropout, nn.Dropout2d,
    )
    return adapt_step_mode_graph(
        gm,
        context="ParallelConversionRecipe step-mode adapter",
        wrap_module_types=stateless,
        safe_module_types=ACTIVATION_TYPES,
        safe_call_functions=(F.dropout,),
    )


# ---------------------------------------------------------------------------------------------
def _unique_name(gm: fx.GraphModule, base_name: str) -> str:
    existing = dict(gm.named_modules())
    if base_name not in existing:
        return base_name
    i = 1
    while f"{base_name}_{i}" in existing:
        i += 1
    return f"{base_name}_{i}"


def _owner_prefix(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.keys())[-1].split("@")[0]
    return path


def _to_module_node(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base_name: str, args) -> fx.Node:
    prefix = _owner_prefix(node)
    name = _unique_name(gm, f"{prefix}.{base_name}" if prefix else base_name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args=tuple(args))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _clamp_bounds(node: fx.Node):
    lo = _arg(node, 1, "min")
    hi = _arg(node, 2, "max")
    return lo, hi


def _relu_like(lo, hi) -> Optional[nn.Module]:
    """The canonical module for clamp(lo, hi), if it is a (clipped) ReLU."""
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        return None
    if lo is None or float(lo) != 0.0:
        return None
    if hi is None or (isinstance(hi, float) and math.isinf(hi)):
        return nn.ReLU()
    if float(hi) <= 0:
        return None
    return ClipReLU(float(hi))


def _canonicalise(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    seen_targets = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = modules[node.target]
            rep = None
            if isinstance(mod, nn.ReLU6):
                rep = ClipReLU(6.0)
            elif type(mod) is nn.Hardtanh:
                rep = _relu_like(mod.min_val, mod.max_val)
            elif type(mod) is nn.ReLU and mod.inplace:
                rep = nn.ReLU()
            if rep is not None:
                # same name, canonical module (shared calls are split below)
                parent, _, child = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, child, rep)
                modules[node.target] = rep
                mod = rep
            if isinstance(mod, ACTIVATION_TYPES):
                if node.target in seen_targets:
                    # A module called more than once (torchvision's shared self.relu): each call
                    # site becomes its own neuron with its own thresholds.
                    clone = copy.deepcopy(mod)
                    _to_module_node(gm, node, clone, node.target.rsplit(".", 1)[-1], node.args[:1])
                else:
                    seen_targets.add(node.target)
            continue
        if node.op == "call_function":
            t = node.target
            if t in _RELU_FUNCTIONS:
                _to_module_node(gm, node, nn.ReLU(), "relu", node.args[:1])
            elif t is F.relu6:
                _to_module_node(gm, node, ClipReLU(6.0), "relu6", node.args[:1])
            elif t in (torch.clamp, torch.clip):
                rep = _relu_like(*_clamp_bounds(node))
                if rep is not None:
                    _to_module_node(gm, node, rep, "clamp", node.args[:1])
            elif t is F.hardtanh:
                rep = _relu_like(_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0))
                if rep is not None:
                    _to_module_node(gm, node, rep, "hardtanh", node.args[:1])
            elif t is F.pad:
                pad = _arg(node, 1, "pad")
                mode = _arg(node, 2, "mode", "constant")
                value = _arg(node, 3, "value", None)
                if mode == "constant" and not isinstance(pad, fx.Node) and all(isinstance(p, int) for p in pad):
                    _to_module_node(gm, node, StepPad(pad, mode, value), "pad", node.args[:1])
            elif t is F.dropout:
                _to_module_node(gm, node, nn.Dropout(p=_arg(node, 1, "p", 0.5)), "dropout", node.args[:1])
            elif t is F.adaptive_avg_pool2d:
                _to_module_node(gm, node, nn.AdaptiveAvgPool2d(_arg(node, 1, "output_size")), "avgpool", node.args[:1])
            elif t is F.avg_pool2d:
                ks = _arg(node, 1, "kernel_size")
                _to_module_node(gm, node, nn.AvgPool2d(ks, _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0)),
                                "avgpool", node.args[:1])
            elif t is F.max_pool2d:
                ks = _arg(node, 1, "kernel_size")
                _to_module_node(gm, node, nn.MaxPool2d(ks, _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0)),
                                "maxpool", node.args[:1])
            continue
        if node.op == "call_method":
            if node.target == "contiguous" and len(node.args) == 1:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            elif node.target == "relu":
                _to_module_node(gm, node, nn.ReLU(), "relu", node.args[:1])
            elif node.target in ("clamp", "clip"):
                rep = _relu_like(*_clamp_bounds(node))
                if rep is not None:
                    _to_module_node(gm, node, rep, "clamp", node.args[:1])
    gm.graph.lint()
    gm.recompile()


def _move_maxpools_after_activations(gm: fx.GraphModule) -> None:
    """Rewrite ``maxpool -> act`` as ``act -> maxpool`` (exact for monotone activations)."""
    changed = True
    while changed:
        changed = False
        modules = dict(gm.named_modules())
        for act in list(gm.graph.nodes):
            if not is_activation_site(act, modules):
                continue
            pool = act.args[0]
            if not (isinstance(pool, fx.Node) and pool.op == "call_module"
                    and isinstance(modules.get(pool.target), _MAXPOOL_MODULES)
                    and len(pool.users) == 1):
                continue
            src = pool.args[0]
            # act(src) then pool(act): move act in front of the pool.
            pool.prepend(act)
            act.args = (src,) + tuple(act.args[1:])
            act.replace_all_uses_with(pool, delete_user_cb=lambda user: user is not pool)
            pool.args = (act,) + tuple(pool.args[1:])
            changed = True
    gm.graph.lint()
    gm.recompile()


def _spiking_source(node, modules) -> bool:
    """True when ``node`` carries sorted spike trains with per-channel spike values."""
    if not isinstance(node, fx.Node):
        return False
    if is_activation_site(node, modules):
        return True
    if node.op == "call_module" and isinstance(modules.get(node.target), _MAXPOOL_MODULES + (nn.Dropout, nn.Identity)):
        return _spiking_source(node.args[0], modules)
    return False


def validate_graph(gm: fx.GraphModule) -> None:
    """Reject every node that does not commute with the time mean (see docs/limits)."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, ACTIVATION_TYPES):
                continue
            if isinstance(mod, _MAXPOOL_MODULES):
                if getattr(mod, "return_indices", False):
                    raise GraphConversionError(f"{describe(node)}: max pooling with return_indices is not supported")
                if not _spiking_source(node.args[0], modules):
                    raise GraphConversionError(
                        f"{describe(node)}: max pooling of analog currents is not exact in a spiking "
                        "network (the time mean of a max is not the max of the time mean); place the "
                        "pool directly after an activation")
                continue
            if isinstance(mod, (StepPad, base.StepModule, base.MemoryModule)) or isinstance(mod, _LINEAR_MODULES):
                continue
            raise GraphConversionError(
                f"{describe(node)}: module type {type(mod).__name__} is not supported by parallel "
                "conversion (only linear layers, pooling, padding, reshaping, residual additions, "
                "concatenation and ReLU/QCFS-family activations are)")
        if node.op == "call_function":
            t = node.target
            if t in _PASS_FUNCTIONS or hasattr(t, "_fields"):
                continue
            if t in (operator.mul, torch.mul, operator.truediv, torch.div):
                if sum(isinstance(a, fx.Node) for a in node.args) <= 1:
                    continue  # scaling by a constant is linear
                raise GraphConversionError(
                    f"{describe(node)}: the product of two tensors does not commute with the time mean")
            name = getattr(t, "__name__", repr(t))
            raise GraphConversionError(f"{describe(node)}: function {name} is not supported by parallel conversion")
        if node.op == "call_method":
            if node.target in _PASS_METHODS:
                continue
            raise GraphConversionError(
                f"{describe(node)}: tensor method .{node.target}() is not supported by parallel conversion")
