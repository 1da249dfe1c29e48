"""Passes the recipe applies to the graph SpikingJelly's converter traced, before its own passes.

SpikingJelly's ``FXConverter`` traces with a plain ``torch.fx.Tracer`` and offers no way to
choose another; the recipe therefore leaves that tracer alone and works on what it produces:

* :func:`activation_calls_to_modules`: the package's activations reach the graph as one
  ``call_function`` node of :func:`~sj_parallel_conversion.activation.activation_call` each (a
  :func:`torch.fx.wrap` leaf); this turns every such node into a ``call_module`` node of the
  activation, the form the rest of the conversion works on;
* :func:`fold_bn`: BatchNorm folded into the convolution that feeds it, with torch's public
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``.
"""
from __future__ import annotations

from collections import Counter

from torch import fx
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .activation import activation_call
from .patterns import module_pattern

__all__ = ["activation_calls_to_modules", "fold_bn"]

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
