"""Canonicalisation: the rewrites that bring a traced ANN into the form validation checks.

Every pattern the table marks ``"canonicalised"`` (:mod:`~.patterns`) is rewritten here into what
its ``becomes`` names:

* every activation call site is its own ``call_module`` node (``nn.ReLU`` / ``F.relu`` /
  ``torch.relu`` / ``clamp(min=0)`` become :class:`nn.ReLU`; ``nn.ReLU6`` / ``clamp(0, c)`` /
  ``hardtanh(0, c)`` become :class:`~sj_parallel_conversion.ClipReLU`; a module called twice is
  copied so that each call gets its own neuron);
* functional pools, padding, interpolation and dropout, constant padding modules, scaling by a
  constant (:class:`~.step_modules.ConstantScale`) and channel chunks
  (:class:`~.step_modules.ChunkPart`) become modules the step-mode adapter understands, and the
  function or method forms the adapter does not know become the ones it does;
* a max pool placed before an activation is moved after it (exact on the ANN side, since the
  activations are monotone, and exact on sorted spike trains, which pooling of currents is not).

A rewrite that does not apply (a clamp with a non-zero lower bound, reflection padding) leaves the
node for validation to report.
"""
from __future__ import annotations

import builtins
import copy
import inspect
import math
import operator
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from .activation import ClipReLU
from .fx_nodes import arg, literal_int, replace_by_module
from .patterns import (CANONICAL, FUNCTION_PATTERNS, METHOD_PATTERNS, function_pattern,
                       method_pattern, module_pattern, module_types)
from .sites import ACTIVATION_TYPES, is_activation_site
from .step_modules import ChunkPart, ConstantScale, StepPad

__all__ = ["canonicalise", "move_maxpools_after_activations", "resolve_in_place", "views_to_reshapes", "static_nodes"]


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


def _constant_pad(m: nn.Module) -> StepPad:
    return StepPad(m.padding, "constant", float(m.value))


# Module types the table marks canonicalised: the module that replaces one (None: left as it is).
MODULE_REWRITES: Dict[type, Callable[[nn.Module], Optional[nn.Module]]] = {
    nn.ReLU6: lambda m: ClipReLU(6.0),
    nn.Hardtanh: lambda m: _relu_like(m.min_val, m.max_val),
    **{t: _constant_pad for t in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                                  nn.ConstantPad3d)},
}


def _pad(node: fx.Node) -> Optional[nn.Module]:
    pad, mode, value = arg(node, 1, "pad"), arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    if mode == "constant" and not isinstance(pad, fx.Node) and all(isinstance(p, int) for p in pad):
        return StepPad(pad, mode, value)
    return None


def _literal(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_literal(v) for v in value)
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _interpolate(node: fx.Node) -> Optional[nn.Module]:
    size, scale = arg(node, 1, "size"), arg(node, 2, "scale_factor")
    mode, corners = arg(node, 3, "mode", "nearest"), arg(node, 4, "align_corners")
    recompute, antialias = arg(node, 5, "recompute_scale_factor"), arg(node, 6, "antialias", False)
    if not (_literal(size) and _literal(scale) and isinstance(mode, str) and corners in (None, True, False)
            and recompute in (None, True, False) and antialias is False):
        return None
    return nn.Upsample(size, scale, mode, corners, recompute)


def _avg_pool(node: fx.Node) -> Optional[nn.Module]:
    kernel, stride, padding = arg(node, 1, "kernel_size"), arg(node, 2, "stride"), arg(node, 3, "padding", 0)
    ceil, include_pad = arg(node, 4, "ceil_mode", False), arg(node, 5, "count_include_pad", True)
    divisor = arg(node, 6, "divisor_override")
    # A size computed from a shape is a graph node, which a module cannot hold: left for
    # validation to report rather than written into the module.
    if not (_literal(kernel) and _literal(stride) and _literal(padding) and _literal(divisor)
            and ceil in (True, False) and include_pad in (True, False)):
        return None
    return nn.AvgPool2d(kernel, stride, padding, ceil, include_pad, divisor)


def _max_pool(node: fx.Node) -> Optional[nn.Module]:
    kernel, stride, padding = arg(node, 1, "kernel_size"), arg(node, 2, "stride"), arg(node, 3, "padding", 0)
    dilation, ceil = arg(node, 4, "dilation", 1), arg(node, 5, "ceil_mode", False)
    indices = arg(node, 6, "return_indices", False)
    if not (_literal(kernel) and _literal(stride) and _literal(padding) and _literal(dilation)
            and ceil in (True, False) and indices is False):
        return None
    return nn.MaxPool2d(kernel, stride, padding, dilation, return_indices=False, ceil_mode=ceil)


def _adaptive_avg_pool(node: fx.Node) -> Optional[nn.Module]:
    size = arg(node, 1, "output_size")
    return nn.AdaptiveAvgPool2d(size) if _literal(size) else None


# Functions and methods the table marks canonicalised into a module: (builder, name of the new
# module). A builder returning None leaves the node.
_RELU = (lambda node: nn.ReLU(), "relu")
_CLAMP = (lambda node: _relu_like(arg(node, 1, "min"), arg(node, 2, "max")), "clamp")
FUNCTION_REWRITES: Dict[object, Tuple[Callable[[fx.Node], Optional[nn.Module]], str]] = {
    F.relu: _RELU, F.relu_: _RELU, torch.relu: _RELU, torch.relu_: _RELU, "relu": _RELU,
    F.relu6: (lambda node: ClipReLU(6.0), "relu6"),
    torch.clamp: _CLAMP, torch.clip: _CLAMP, "clamp": _CLAMP, "clip": _CLAMP,
    F.hardtanh: (lambda node: _relu_like(arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)), "hardtanh"),
    F.pad: (_pad, "pad"),
    F.dropout: (lambda node: nn.Dropout(p=arg(node, 1, "p", 0.5)), "dropout"),
    F.adaptive_avg_pool2d: (_adaptive_avg_pool, "avgpool"),
    F.avg_pool2d: (_avg_pool, "avgpool"),
    F.max_pool2d: (_max_pool, "maxpool"),
    F.interpolate: (_interpolate, "upsample"),
}


def _as_function(node: fx.Node, gm: fx.GraphModule) -> None:
    """``x.add(y)`` -> ``x + y`` (the adapter knows the operator, not the method); keywords such as
    ``alpha`` leave the node for validation."""
    if not node.kwargs:
        node.op, node.target = "call_function", method_pattern(node.target).becomes


def _as_method(node: fx.Node, gm: fx.GraphModule) -> None:
    """``torch.permute(x, dims)`` -> ``x.permute(dims)``, the form SpikingJelly's adapter rewrites."""
    if not node.kwargs:
        node.op, node.target = "call_method", function_pattern(node.target).becomes


def _drop(node: fx.Node, gm: fx.GraphModule) -> None:
    """``x.contiguous()`` -> ``x``. The step-mode adapter has no .contiguous(); dropping it is safe
    because every .view() becomes a .reshape() (:func:`views_to_reshapes`: the same values, a copy
    where a view of the now non-contiguous tensor would fail)."""
    if len(node.args) == 1 and not node.kwargs:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


# Canonicalised functions and methods rewritten in place rather than into a module.
NODE_REWRITES: Dict[object, Callable[[fx.Node, fx.GraphModule], None]] = {
    "add": _as_function, "sub": _as_function, "neg": _as_function,
    torch.permute: _as_method, "contiguous": _drop,
}

# Scaling and chunks need to know which values are constant: whole-graph passes below.
_SCALES = {p.target for p in FUNCTION_PATTERNS + METHOD_PATTERNS if p.becomes is ConstantScale}
_DIVISIONS = {operator.truediv, torch.div, torch.true_divide, "div", "true_divide"}
_CHUNKS = {p.target for p in FUNCTION_PATTERNS + METHOD_PATTERNS if p.becomes is ChunkPart}
_STATIC_METHODS = {p.target for p in METHOD_PATTERNS if p.static}


def _stochastic_depth(t) -> bool:
    """torchvision's stochastic depth (found by name: torchvision is optional here)."""
    return getattr(t, "__name__", "") == "stochastic_depth" and getattr(t, "__module__", "").startswith("torchvision.ops")


# Operations whose result may share memory with their first operand: an in-place write into one
# is seen through the others. Dropout and Identity return their input itself in eval mode.
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose",
                 "swapaxes", "movedim", "t", "unsqueeze", "squeeze", "expand", "expand_as", "narrow", "select",
                 "chunk", "split", "unbind", "contiguous", "detach", "diagonal", "as_strided"}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose,
                   torch.swapaxes, torch.movedim, torch.t, torch.unsqueeze, torch.squeeze, torch.narrow,
                   torch.select, torch.chunk, torch.split, torch.unbind, torch.detach, F.dropout}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout, nn.FeatureAlphaDropout)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift}


def _inplace_flag(node: fx.Node) -> bool:
    """The ``inplace`` argument of a functional call such as ``F.relu(x, inplace=True)``."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or a call that would fail anyway
        return False
    return bound.arguments.get("inplace") is True


def _writes_in_place(node: fx.Node, modules: Dict[str, nn.Module], shapes: set) -> bool:
    """Whether ``node`` writes its result into its first operand (a tensor of the graph)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or node.args[0] in shapes:
        return False  # shape values are Python numbers: nothing to write into
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.startswith("_")) or _inplace_flag(node)
    return False


def _returns_alias(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _VIEW_MODULES)
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def resolve_in_place(gm: fx.GraphModule) -> None:
    """Give the graph the values an in-place write leaves behind.

    After ``relu_(a)``, ``F.relu(a, inplace=True)`` or ``nn.ReLU(inplace=True)(a)`` every later
    read of ``a`` sees the written values; the converted network computes each operation out of
    place, so those reads are pointed at the write's result. (``a += b`` reaches the graph as
    ``a = a + b``, which needs nothing; only an explicit ``operator.iadd(a, b)`` is a write.) A write into a tensor that shares memory with another one
    read afterwards (a slice, a view, a reshape) is marked for validation to refuse, since its
    effect on the other tensor is not visible in the graph.
    """
    modules = dict(gm.named_modules())
    shapes = static_nodes(gm, attributes=False)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        if not _writes_in_place(node, modules, shapes):
            continue
        target = node.args[0]
        # Every tensor sharing memory with target: up through the ops it is an alias of, then down
        # through their aliasing users (not through this write itself).
        root = target
        while _returns_alias(root, modules) and root.args and isinstance(root.args[0], fx.Node):
            root = root.args[0]
        shared, stack = set(), [root]
        while stack:
            n = stack.pop()
            if n in shared or n is node:
                continue
            shared.add(n)
            # Views of target taken after the write read the written values (they are pointed at
            # the write below); views of the other tensors sharing its memory do not.
            stack.extend(u for u in n.users if _returns_alias(u, modules)
                         and not (n is target and order[u] > order[node]))
        seen_later = [n for n in shared if n is not target and any(order[u] > order[node] for u in n.users)]
        if seen_later:
            # Rewrites below may turn the node into a module call: keep what the model wrote.
            name = getattr(node.target, "__name__", str(node.target))
            written = (f"{type(modules[node.target]).__name__}(inplace=True)" if node.op == "call_module"
                       else f"{name}(..., inplace=True)" if node.op == "call_function" and _inplace_flag(node)
                       else name)
            node.meta["sjpc_in_place_alias"] = (written, seen_later[0].name)
            continue
        for user in [u for u in target.users if u is not node and order[u] > order[node]]:
            user.replace_input_with(target, node)


def canonicalise(gm: fx.GraphModule) -> None:
    """Rewrite every canonicalised pattern of ``gm`` in place (see the module documentation)."""
    resolve_in_place(gm)
    modules = dict(gm.named_modules())
    seen_targets = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = modules[node.target]
            pattern = module_pattern(mod)
            rep = None
            if pattern is not None and pattern.multistep == CANONICAL and type(mod) in MODULE_REWRITES:
                rep = MODULE_REWRITES[type(mod)](mod)
            elif type(mod) is nn.ReLU and mod.inplace:
                rep = nn.ReLU()
            elif type(mod) in (nn.Dropout, nn.Dropout2d) and mod.inplace:
                # In-place dropout (MNASNet's classifier) is the identity in eval mode, as is its
                # out-of-place twin, which SpikingJelly's step-mode adapter accepts.
                rep = type(mod)(mod.p).train(mod.training)
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
                    replace_by_module(gm, node, clone, node.target.rsplit(".", 1)[-1], node.args[:1])
                else:
                    seen_targets.add(node.target)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        t = node.target
        pattern = function_pattern(t) if node.op == "call_function" else method_pattern(t)
        if pattern is None or pattern.multistep != CANONICAL:
            if node.op == "call_function" and _stochastic_depth(t) and arg(node, 3, "training") is False:
                # torchvision's stochastic depth traced in eval mode: the identity.
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            continue
        if t in FUNCTION_REWRITES:
            build, name = FUNCTION_REWRITES[t]
            rep = build(node)
            if rep is not None:
                replace_by_module(gm, node, rep, name, node.args[:1])
        elif t in NODE_REWRITES:
            NODE_REWRITES[t](node, gm)
    _scales_to_modules(gm)
    _chunks_to_modules(gm)
    gm.graph.lint()
    gm.recompile()


def views_to_reshapes(gm: fx.GraphModule) -> None:
    """``x.view(sizes)`` -> ``x.reshape(sizes)`` (see the ``contiguous`` rewrite)."""
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "view" and not node.kwargs and not any(
                isinstance(a, torch.dtype) for a in node.args[1:]):
            node.target = "reshape"
            node.meta["sjpc_written_as"] = "view"  # error messages show what the user wrote


def static_nodes(gm: fx.GraphModule, attributes: bool = True) -> set:
    """Nodes whose value is the same at every time step: parameters, shapes and arithmetic on them
    (``attributes=False``: shapes and arithmetic on them only, the values that are not tensors)."""
    static = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if attributes:
                static.add(node)
        elif node.op == "call_method" and node.target in _STATIC_METHODS:
            static.add(node)
        elif node.op == "call_function" and node.target is builtins.getattr:
            if attributes or node.args[1] in ("shape", "ndim", "dtype", "device"):  # x.T is a tensor
                static.add(node)
        elif node.op in ("call_function", "call_method") and all(i in static for i in node.all_input_nodes):
            if attributes or node.all_input_nodes:  # torch.ones(...) makes a tensor from nothing
                static.add(node)
    return static


def _is_constant(value, static: set) -> bool:
    if isinstance(value, fx.Node):
        return value in static
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scales_to_modules(gm: fx.GraphModule) -> None:
    """``x * c``, ``c * x`` and ``x / c`` with a constant ``c`` become :class:`ConstantScale` modules."""
    static = static_nodes(gm)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node in static or len(node.args) != 2:
            continue
        target = node.target
        if target not in _SCALES:
            continue
        divide = target in _DIVISIONS
        if divide and node.kwargs.get("rounding_mode") is not None:
            continue  # floor/trunc division is not linear: left for validation to report
        if node.kwargs and set(node.kwargs) - {"rounding_mode"}:
            continue
        a, b = node.args
        if _is_constant(b, static) and isinstance(a, fx.Node):
            x, c = a, b
        elif not divide and _is_constant(a, static) and isinstance(b, fx.Node):
            x, c = b, a
        else:
            continue
        if isinstance(c, fx.Node):
            replace_by_module(gm, node, ConstantScale(divide), "div" if divide else "mul", (x, c))
        else:
            replace_by_module(gm, node, ConstantScale(divide, float(c)), "div" if divide else "mul", (x,))


def _chunks_to_modules(gm: fx.GraphModule) -> None:
    """``a, b = x.chunk(2, dim)`` (dim != 0) becomes one :class:`ChunkPart` module per part used."""
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _CHUNKS:
            continue
        chunks, dim = arg(node, 1, "chunks"), arg(node, 2, "dim", 0)
        users = list(node.users)
        if not (literal_int(chunks) and literal_int(dim) and dim != 0 and users and all(
                u.op == "call_function" and u.target is operator.getitem and literal_int(u.args[1])
                for u in users)):
            continue  # left for validation to report
        for user in users:
            replace_by_module(gm, user, ChunkPart(chunks, user.args[1], dim), f"chunk{user.args[1]}",
                              (node.args[0],))
        gm.graph.erase_node(node)


def move_maxpools_after_activations(gm: fx.GraphModule) -> None:
    """Rewrite ``maxpool -> act`` as ``act -> maxpool`` (exact for monotone activations)."""
    max_pools = module_types(lambda p: p.role == "max pool" and p.accepted)
    changed = True
    while changed:
        changed = False
        modules = dict(gm.named_modules())
        for act in list(gm.graph.nodes):
            if not is_activation_site(act, modules):
                continue
            pool = act.args[0]
            if not (isinstance(pool, fx.Node) and pool.op == "call_module"
                    and isinstance(modules.get(pool.target), max_pools)
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
