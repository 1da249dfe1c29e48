"""Joins of spike trains of different lengths (per-layer time steps).

With per-layer ``T`` two branches of a network can carry trains of different lengths, for
example a residual block whose inner neuron runs 4 steps while its shortcut carries 8. Adding
them step by step is undefined. Every layer between two parallel neurons commutes with the time
mean, and every parallel neuron reads only the time mean of its input, so a join may replace
each of its operands by its time mean (a one-step train, ``[1, N, ...]``) without changing what
any neuron downstream computes. :func:`insert_time_joins` finds such joins by propagating the
time length of every tensor through the graph and puts a :class:`TimeMean` in front of each
operand of a join whose operands' lengths differ. In the count domain
(:func:`~sj_parallel_conversion.count_domain_model`) every tensor already is a time mean, so a
:class:`TimeMean` there becomes the identity.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import base
from torch import fx

__all__ = ["TimeMean", "insert_time_joins"]

# The time length of a tensor in a converted graph: an int (the T of the neuron it comes from,
# 1 after a join) or INPUT (whatever number of steps the caller feeds).
INPUT = "input"
Length = Union[int, str]

_NON_TENSOR_METHODS = {"size", "dim"}


class TimeMean(nn.Module, base.StepModule):
    """The time mean of a train, kept as one step (``[T, N, ...] -> [1, N, ...]``); multi-step only.

    :func:`~sj_parallel_conversion.count_domain_model` replaces it by the identity.
    """

    def __init__(self, step_mode: str = "m"):
        super().__init__()
        self.step_mode = step_mode

    def supported_step_mode(self):
        return ("m",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(0, keepdim=True)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"


def insert_time_joins(gm: fx.GraphModule) -> fx.GraphModule:
    """Put a :class:`TimeMean` before each operand of every join whose operands' lengths differ.

    Returns ``gm`` (modified in place and recompiled); graphs whose trains all share one length
    are left unchanged.
    """
    from .neuron import ParallelConversionNode

    modules = dict(gm.named_modules())
    lengths: Dict[fx.Node, Optional[Length]] = {}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            lengths[node] = INPUT
            continue
        if node.op == "get_attr" or (node.op == "call_method" and node.target in _NON_TENSOR_METHODS) or (
                node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr"):
            lengths[node] = None
            continue
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, ParallelConversionNode):
            lengths[node] = mod.T
            continue
        if isinstance(mod, TimeMean):
            lengths[node] = 1
            continue
        operands = [i for i in node.all_input_nodes if lengths.get(i) is not None]
        found = {lengths[i] for i in operands}
        if len(found) <= 1 or node.op == "output":
            lengths[node] = found.pop() if found else None
            continue
        for operand in operands:
            name = f"time_join_{count}"
            count += 1
            gm.add_submodule(name, TimeMean("m"))
            with gm.graph.inserting_before(node):
                mean = gm.graph.call_module(name, args=(operand,))
            node.replace_input_with(operand, mean)
            lengths[mean] = 1
        lengths[node] = 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return gm
