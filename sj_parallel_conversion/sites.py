"""Activation sites: the call sites of a canonical graph where a neuron takes the activation's place.

A site is a ``call_module`` node whose module the pattern table replaces by a neuron (ReLU,
ClipReLU, QCFS, DAQCFS); :func:`keep_analog` keeps chosen ReLU sites analog instead.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch.nn as nn
from torch import fx

from .graph_errors import GraphConversionError, GraphProblem
from .patterns import REPLACED, module_pattern, module_types
from .step_modules import AnalogReLU

__all__ = ["ACTIVATION_TYPES", "activation_sites", "is_activation_module", "is_activation_site", "keep_analog"]

#: The module types a neuron replaces (from the pattern table).
ACTIVATION_TYPES = module_types(lambda p: p.multistep == REPLACED)


def is_activation_module(module: nn.Module) -> bool:
    """True for a module the pattern table replaces by a neuron (not an :class:`AnalogReLU`)."""
    pattern = module_pattern(module)
    return pattern is not None and pattern.multistep == REPLACED


def is_activation_site(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """True for a ``call_module`` node whose module is one of the convertible activations."""
    m = modules.get(node.target) if node.op == "call_module" else None
    return m is not None and is_activation_module(m)


def activation_sites(gm: fx.GraphModule) -> List[fx.Node]:
    """Activation call sites in execution (topological) order."""
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if is_activation_site(n, modules)]


def keep_analog(gm: fx.GraphModule, names: Iterable[str]) -> fx.GraphModule:
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
                msg = (f"activation site {name!r} cannot stay analog: spiking site {node.target!r} precedes it, "
                       "so its input changes over time")
                raise GraphConversionError(msg, [GraphProblem(sites[name].name, "analog site", name, msg)])
            stack.extend(node.all_input_nodes)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, AnalogReLU())
    return gm
