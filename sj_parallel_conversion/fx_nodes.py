"""Reading and rewriting single ``torch.fx`` nodes, for the graph passes, and where a module runs."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import fx

from .graph_errors import owner_prefix

__all__ = ["arg", "literal_int", "module_device", "replace_by_module"]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def literal_int(value: Any) -> bool:
    """An int written in the model (not a node, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_name(gm: fx.GraphModule, base_name: str) -> str:
    existing = dict(gm.named_modules())
    if base_name not in existing:
        return base_name
    i = 1
    while f"{base_name}_{i}" in existing:
        i += 1
    return f"{base_name}_{i}"


def replace_by_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base_name: str, args) -> fx.Node:
    """Replace ``node`` by a call of ``module`` on ``args``, added beside the module ``node`` sits in
    (so error messages and site names keep pointing there)."""
    prefix = owner_prefix(node)
    name = _unique_name(gm, f"{prefix}.{base_name}" if prefix else base_name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args=tuple(args))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """The device of ``module``'s first parameter, else of its first buffer, else ``default``:
    where the checks that run a model on calibration images send the images."""
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return default if t is None else t.device
