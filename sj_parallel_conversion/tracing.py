"""Passes the recipe applies to the graph SpikingJelly's converter traced, before its own passes.

SpikingJelly's ``FXConverter`` traces with a plain ``torch.fx.Tracer`` and offers no way to
choose another; the recipe therefore leaves that tracer alone and works on what it produces:

* :func:`activation_calls_to_modules`: the package's activations reach the graph as one
  ``call_function`` node of :func:`~sj_parallel_conversion.activation.activation_call` each (a
  :func:`torch.fx.wrap` leaf); this turns every such node into a ``call_module`` node of the
  activation, the form the rest of the conversion works on;
* :func:`fold_bn`: BatchNorm folded into the convolution that feeds it, with torch's public
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``;
* :func:`check_trace`: the prepared graph computes what the model computes, measured on
  calibration images (a trace records tensor operations, not which Python names share a tensor).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, List

import torch
import torch.nn as nn
from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .activation import activation_call
from .fx_nodes import module_device
from .patterns import module_pattern

__all__ = ["activation_calls_to_modules", "check_trace", "fold_bn"]

#: Largest difference between model and graph accepted, relative to the output's largest magnitude:
#: the two run the same operations (only reshapes, moved max pools and out-of-place twins differ),
#: so anything beyond rounding is a different function.
TRACE_TOLERANCE = 1e-4
#: The smallest output magnitude the tolerance is taken of: an output of zeros is compared absolutely.
TRACE_FLOOR = 1e-3

def activation_calls_to_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace each ``activation_call(module, x)`` node by a ``call_module`` node of ``module``.

    The new node keeps the old node's metadata (``nn_module_stack`` names the module it came from
    in error messages). Raises :class:`ValueError` naming the node when the module
    argument is not a submodule of ``gm``.
    """
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not activation_call:
            continue
        if len(node.args) != 2 or node.kwargs:
            raise ValueError(f"graph node '{node.name}': activation_call expects (module, input), got "
                             f"args={node.args!r} kwargs={node.kwargs!r}")
        owner, x = node.args
        if not (isinstance(owner, fx.Node) and owner.op == "get_attr"):
            raise ValueError(f"graph node '{node.name}': the activation module is not an attribute of the "
                             f"traced model (argument {owner!r})")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(owner.target, args=(x,))
        new.meta = dict(node.meta)
        new.meta.pop("is_wrapped", None)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not owner.users:
            gm.graph.erase_node(owner)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every eval-mode BatchNorm whose only input is a convolution used once into that conv.

    A convolution with other users, or a module called from several graph nodes, keeps its
    BatchNorm (folding would change the other calls). Raises :class:`ValueError` naming the
    modules when one of a foldable pair is in training mode.
    """
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"):
            continue
        conv, bn = modules[src.target], modules[node.target]
        pattern = module_pattern(bn)
        if pattern is None or pattern.folds_into is None or not isinstance(conv, pattern.folds_into):
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or not bn.track_running_stats:
            continue
        if conv.training or bn.training:
            raise ValueError(f"cannot fold BatchNorm {node.target!r} into {src.target!r}: put the model in "
                             "eval mode first")
        fused = fuse_conv_bn_eval(conv, bn)
        parent, _, child = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, fused)
        modules[src.target] = fused
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm


def _tensor_leaves(value: Any) -> List[torch.Tensor]:
    """The tensors of a model output: a tensor, or tuples, lists and dicts of them."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    return []


def check_trace(model: nn.Module, graph: fx.GraphModule, x: torch.Tensor, name: str) -> None:
    """Raise :class:`~.graph_errors.GraphConversionError` when ``graph`` (the model as traced and
    canonicalised, BatchNorm not yet folded) gives another output than ``model`` on ``x``.

    torch.fx records ``y += h`` as ``y = y + h``: a second name bound to the same tensor before
    an in-place write (``z = y; y += h``) still reads the old values in the trace, and the
    converted network would compute a different function without any error.
    """
    from .graph_errors import GraphConversionError, GraphProblem

    def run(module: nn.Module) -> List[torch.Tensor]:
        with torch.no_grad():
            # A copy per run: an in-place write into the input must not reach the other run.
            out = module(x.clone().to(module_device(module, x.device)))
        return [t.detach().float().cpu() for t in _tensor_leaves(out)]

    graph.eval()  # as the converted network runs: modules canonicalisation wrote start in training mode
    try:
        expected = run(model)
    except Exception as exc:
        raise ValueError(f"{name} cannot run on the first calibration batch (input shape {tuple(x.shape)}, dtype "
                         f"{x.dtype}): {type(exc).__name__}: {exc}") from exc
    got = run(graph)
    if [t.shape for t in expected] != [t.shape for t in got]:
        worst = float("inf")
        what = (f"the outputs have shapes {[tuple(t.shape) for t in got]} instead of "
                f"{[tuple(t.shape) for t in expected]}")
    else:
        worst = 0.0
        for a, b in zip(expected, got):
            if not a.numel():
                continue
            # Equal values (infinities included) and NaN in both agree; NaN in one only does not.
            diff = torch.where((a == b) | (a.isnan() & b.isnan()), torch.zeros_like(a), (a - b).abs())
            diff = torch.nan_to_num(diff, nan=float("inf"))
            scale = max(float(torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).abs().max()), TRACE_FLOOR)
            worst = max(worst, float(diff.max()) / scale)
        what = f"the outputs differ by {worst:.3g} of their largest magnitude"
    if not worst <= TRACE_TOLERANCE:
        msg = (f"{name} as traced by torch.fx does not compute what {name}.forward computes: on the first "
               f"calibration batch (eval mode) {what}. "
               "A trace records tensor operations, not which Python names share a tensor: after an in-place "
               "write such as y += h or relu_(y), a name bound to y before it (z = y) reads the old values in "
               "the trace; write the update out of place (y = y + h) or copy first (z = y * 1). A forward "
               "that is random in eval mode (F.dropout(x, p) without training=self.training) differs too")
        raise GraphConversionError(msg, [GraphProblem("", "trace differs from the model", "", msg)])
