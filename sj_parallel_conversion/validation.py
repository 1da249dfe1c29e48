"""Static validation: does every operation of a canonical graph commute with the time mean?

:func:`validate_graph` reads the pattern table (:mod:`~.patterns`) for every module, function and
method, and checks on top what the table cannot say about a single operation: that a max pool
reads sorted spike trains, that no operation reaches the batch axis (through which a converted
network runs its time steps), and which values are the same at every step (shapes, parameters).
It raises one :class:`~.graph_errors.GraphConversionError` listing every problem.
"""
from __future__ import annotations

import builtins
import operator
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch import fx

from .fx_nodes import arg, literal_int
from .graph_errors import GraphConversionError, GraphProblem, describe, owner_path
from .patterns import METHOD_PATTERNS, ModulePattern, function_pattern, method_pattern, module_pattern
from .sites import is_activation_site

__all__ = ["BATCH_AXIS_HINT", "validate_graph", "value_kinds", "TENSOR"]

# Kinds of values flowing through the graph, for the checks below.
TENSOR = "tensor"     # per-sample data with the batch on axis 0
_STATIC = "static"    # shapes, Python numbers, parameters: the same at every time step
_BATCH = "batch"      # the batch size (x.size(0), x.shape[0]): a static value reshapes may start with
_UNKNOWN = "unknown"  # the result of an unsupported node: not checked further

_STATIC_METHODS = {p.target for p in METHOD_PATTERNS if p.static}
BATCH_AXIS_HINT = ("a converted network runs T time steps through the batch axis, so an operation "
                   "on the batch axis (axis 0) mixes samples with time steps")


def _spiking_source(node, modules) -> bool:
    """True when ``node`` carries sorted spike trains with one spike value per channel.

    Activation sites produce such trains; the patterns that keep spikes (Dropout, Identity, max
    pools) pass them on, and so does a concatenation along the channel axis of such trains (every
    channel still comes from one neuron population), which is what Inception and Fire modules
    feed into their pools.
    """
    if not isinstance(node, fx.Node):
        return False
    if is_activation_site(node, modules):
        return True
    if node.op == "call_module":
        pattern = module_pattern(modules.get(node.target))
        return pattern is not None and pattern.keeps_spikes and _spiking_source(node.args[0], modules)
    if node.op == "call_function" and node.target is torch.cat:
        tensors = arg(node, 0, "tensors")
        # Only the literal channel axis: a negative axis could be a spatial one, where a pool
        # window would mix trains of different spike values.
        return (arg(node, 1, "dim", 0) == 1 and isinstance(tensors, (list, tuple)) and len(tensors) > 0
                and all(_spiking_source(t, modules) for t in tensors))
    return False


def _dims(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _touches_batch(dims) -> Optional[bool]:
    """True when a literal dim list names axis 0; None when a dim is not a literal int."""
    dims = _dims(dims)
    if not all(literal_int(d) for d in dims):
        return None
    return any(d == 0 for d in dims)


def _batch_axis_problem(node: fx.Node, kinds: Dict[fx.Node, str]) -> Optional[str]:
    """Why ``node`` (an op on a per-sample tensor) touches the batch axis, or None."""
    op = node.target
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    if name in ("mean",):
        dim = arg(node, 1, "dim")
        if dim is None:
            return "mean over all axes includes the batch axis"
        hit = _touches_batch(dim)
        if hit is None:
            return f"mean over a non-literal dim {dim!r}"
        return "mean over the batch axis" if hit else None
    if name == "transpose":
        hit = _touches_batch([arg(node, 1, "dim0"), arg(node, 2, "dim1")])
        if hit is None:
            return "transpose with non-literal dims"
        return "transpose involving the batch axis" if hit else None
    if name == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        dims = list(dims) or _dims(node.kwargs.get("dims", []))
        if not dims or not all(literal_int(d) for d in dims):
            return "permute with non-literal dims"
        return None if dims[0] == 0 else "permute that moves the batch axis"
    if name == "unsqueeze":
        dim = arg(node, 1, "dim")
        if not literal_int(dim):
            return "unsqueeze with a non-literal dim"
        return "unsqueeze before the batch axis" if dim == 0 else None
    if name == "unflatten":
        dim = arg(node, 1, "dim")
        if not literal_int(dim):
            return "unflatten with a non-literal dim"
        return "unflatten of the batch axis" if dim == 0 else None
    if name == "flatten":
        start = arg(node, 1, "start_dim", 0)
        if not literal_int(start):
            return "flatten with a non-literal start_dim"
        return "flatten starting at the batch axis" if start == 0 else None
    if name == "cat":
        dim = arg(node, 1, "dim", 0)
        if not literal_int(dim):
            return "concatenation along a non-literal dim"
        return "concatenation along the batch axis" if dim == 0 else None
    if name in ("view", "reshape", "expand"):
        sizes = list(node.args[1:])
        if name == "reshape" and node.op == "call_function":
            sizes = [arg(node, 1, "shape")]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if not sizes:
            return f"{name} without sizes"
        first = sizes[0]
        if isinstance(first, fx.Node) and kinds.get(first) == _BATCH:
            return None
        if first == -1 and len(sizes) > 1:
            return None  # the usual x.view(-1, features): the remaining sizes make up one sample
        return (f"{name} whose first size is {first if not isinstance(first, fx.Node) else first.name!r}, "
                "not the batch size (use x.size(0))")
    if op is operator.getitem:
        item = node.args[1]
        first = item[0] if isinstance(item, tuple) and item else item
        if first is Ellipsis or (isinstance(first, slice) and first == slice(None)):
            return None
        return f"indexing the batch axis with {first!r}"
    return None


def _is_batch_size(node: fx.Node, kinds: Dict[fx.Node, str]) -> bool:
    """``x.size(0)``, ``x.shape[0]`` or ``x.size()[0]`` of a per-sample tensor."""
    if node.op == "call_method" and node.target == "size":
        return kinds.get(node.args[0]) == TENSOR and arg(node, 1, "dim") == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and len(src.args) == 1 and not src.kwargs)
            or (src.op == "call_function" and src.target is builtins.getattr and src.args[1] == "shape"))
    return False


def _refused_module(mod: nn.Module, pattern: Optional[ModulePattern]):
    name = type(mod).__name__
    if pattern is not None and pattern.why:
        return _UNKNOWN, f"module {name}", (f"module type {name} is not supported by parallel conversion: "
                                            f"{pattern.why}")
    extra = ""
    if type(mod).__module__.startswith("spikingjelly"):
        extra = "; SpikingJelly modules convert only where the pattern table lists them"
    return _UNKNOWN, f"module {name}", (
        f"module type {name} is not supported by parallel conversion (only linear layers, pooling, padding, "
        f"reshaping, residual additions, concatenation and ReLU/QCFS-family activations are{extra})")


def _check_module(node: fx.Node, modules: Dict[str, nn.Module], unknown: bool):
    mod = modules[node.target]
    pattern = module_pattern(mod)
    if pattern is None or not pattern.accepted:
        return _refused_module(mod, pattern)
    if pattern.role == "max pool":
        if getattr(mod, "return_indices", False):
            return _UNKNOWN, "max pooling with return_indices", "max pooling with return_indices is not supported"
        if not unknown and not _spiking_source(node.args[0], modules):
            return TENSOR, "max pooling of currents", (
                "max pooling of analog currents is not exact in a spiking network (the time mean of a "
                "max is not the max of the time mean); place the pool directly after an activation "
                "or a channel concatenation of activations")
    if isinstance(mod, nn.Flatten) and mod.start_dim == 0:
        return TENSOR, "batch axis", f"Flatten(start_dim=0) flattens the batch axis; {BATCH_AXIS_HINT}"
    return TENSOR, None, ""


def _check_node(node: fx.Node, modules: Dict[str, nn.Module], kinds: Dict[fx.Node, str]):
    """``(value kind, problem kind or None, reason)`` of one node."""
    if node.op == "placeholder":
        return TENSOR, None, ""
    if node.op == "get_attr":
        return _STATIC, None, ""
    inputs = [kinds.get(i, _STATIC) for i in node.all_input_nodes]
    data = [k for k in inputs if k in (TENSOR, _UNKNOWN)]
    unknown = _UNKNOWN in data
    if node.op == "call_module":
        return _check_module(node, modules, unknown)
    if node.op not in ("call_function", "call_method"):
        return (_UNKNOWN if unknown else TENSOR) if data else _STATIC, None, ""
    target = node.target
    method = node.op == "call_method"
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    if not data:
        # Shape arithmetic, asserts on shapes, parameters: the same at every step.
        return (_BATCH if _is_batch_size(node, kinds) else _STATIC), None, ""
    if (method and target in _STATIC_METHODS) or target is builtins.getattr:
        return (_BATCH if _is_batch_size(node, kinds) else _STATIC), None, ""
    result = _UNKNOWN if unknown else TENSOR
    if target is operator.getitem and kinds.get(node.args[0]) == _UNKNOWN:
        return _UNKNOWN, None, ""  # e.g. one output of an unsupported module returning a tuple
    pattern = method_pattern(target) if method else function_pattern(target)
    if pattern is not None and pattern.role in ("scale", "rounding"):
        # Scaling by a constant became a ConstantScale module in canonicalisation; what is left
        # multiplies two tensors, divides by a tensor, or rounds.
        operands = [a for a in node.args if isinstance(a, fx.Node) and kinds.get(a) in (TENSOR, _UNKNOWN)]
        if len(operands) > 1:  # h * h: one input node, two tensor operands
            return result, "product of tensors", "the product of two tensors does not commute with the time mean"
        return result, f"function {name}", f"{name} by a tensor or with rounding is not linear"
    if name == "chunk":
        return _UNKNOWN, "batch axis", (
            "chunk along the batch axis, along a non-literal dim, or used other than by indexing its "
            f"parts; {BATCH_AXIS_HINT}")
    namedtuple = not method and hasattr(target, "_fields")  # a traced namedtuple: a container
    if not namedtuple and (pattern is None or not pattern.accepted):
        what = f"method .{name}()" if method else f"function {name}"
        reason = (f"tensor method .{name}() is not supported by parallel conversion" if method
                  else f"function {name} is not supported by parallel conversion")
        if pattern is not None and pattern.why:
            reason += f": {pattern.why}"
        return result, what, reason
    if not unknown and pattern is not None and pattern.batch_axis:
        why = _batch_axis_problem(node, kinds)
        if why is not None:
            return result, "batch axis", f"{why}; {BATCH_AXIS_HINT}"
    return result, None, ""


def validate_graph(gm: fx.GraphModule) -> None:
    """Check every node commutes with the time mean (see docs/limits).

    Collects every problem of the graph and raises one :class:`GraphConversionError` listing them
    (``.problems``), so that a user sees all blockers of a model at once.
    """
    modules = dict(gm.named_modules())
    kinds: Dict[fx.Node, str] = {}
    problems: List[GraphProblem] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        kind, problem, reason = _check_node(node, modules, kinds)
        kinds[node] = kind
        alias = node.meta.get("sjpc_in_place_alias")
        if alias is not None and problem is None:
            written, shared = alias
            problem, reason = "in-place write into shared memory", (
                f"{written} writes in place into a tensor that shares memory with '{shared}', which is "
                "read afterwards; the converted network computes every operation out of place, so write "
                "this one out of place (y = relu(x) rather than relu_(x))")
        if problem is not None:
            problems.append(GraphProblem(node.name, problem, owner_path(node), f"{describe(node)}: {reason}"))
    if problems:
        raise GraphConversionError.from_problems(problems)


def value_kinds(gm: fx.GraphModule) -> Dict[fx.Node, str]:
    """What each node of a validated graph carries: ``TENSOR`` for per-sample data, else shapes,
    parameters or the batch size."""
    modules = dict(gm.named_modules())
    kinds: Dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "output":
            kinds[node] = _check_node(node, modules, kinds)[0]
    return kinds
