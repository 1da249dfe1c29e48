"""FX graph rewriting for parallel conversion.

:func:`prepare_graph` turns a traced ANN into a canonical graph in which

* every activation call site is its own ``call_module`` node (``nn.ReLU`` / ``F.relu`` /
  ``torch.relu`` / ``clamp(min=0)`` become :class:`nn.ReLU`; ``nn.ReLU6`` / ``clamp(0, c)`` /
  ``hardtanh(0, c)`` become :class:`~sj_parallel_conversion.ClipReLU`; a module called twice is
  copied so that each call gets its own neuron);
* functional pools, padding and dropout, scaling by a constant (:class:`ConstantScale`) and
  channel chunks (:class:`ChunkPart`) are modules the step-mode adapter understands;
* a max pool placed before an activation is moved after it (exact on the ANN side, since the
  activations are monotone, and exact on sorted spike trains, which pooling of currents is not);
* anything that does not commute with the time mean, or that touches the batch axis (through
  which a converted network runs its time steps), is rejected before calibration starts, with one
  :class:`GraphConversionError` listing every such node and the module it came from.
"""
from __future__ import annotations

import builtins
import copy
import dataclasses
import math
import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import base, functional
from torch import fx

from .activation import DAQCFS, QCFS, ClipReLU

__all__ = [
    "AnalogReLU",
    "ChunkPart",
    "ConstantScale",
    "GraphConversionError",
    "GraphProblem",
    "StepPad",
    "activation_sites",
    "check_batch_axis",
    "is_activation_site",
    "keep_analog",
    "prepare_graph",
    "to_multistep",
    "validate_graph",
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
_SCALE_FUNCTIONS = {operator.mul, torch.mul, operator.truediv, torch.div, torch.true_divide}
_SCALE_METHODS = {"mul", "div", "true_divide"}


@dataclasses.dataclass(frozen=True)
class GraphProblem:
    """One operation of a model that parallel conversion cannot convert exactly.

    ``node``: the graph node's name; ``kind``: what it is (``"module LayerNorm"``,
    ``"function gelu"``, ``"method .softmax()"``, ``"batch axis"``, ``"product of tensors"``,
    ...); ``module``: the path of the module it sits in (``""`` for the top level);
    ``message``: the full one-line description.
    """

    node: str
    kind: str
    module: str
    message: str

    def __str__(self) -> str:
        return self.message


class GraphConversionError(ValueError):
    """A model that parallel conversion cannot handle exactly, found before any calibration.

    ``problems`` lists every unsupported operation (:class:`GraphProblem`); the message's first
    line summarises them, one further line per problem follows. Errors that are not about single
    graph nodes (SpikingJelly's step-mode adapter refusing the model) hold one problem with an
    empty ``node``.
    """

    def __init__(self, message: str, problems: Sequence[GraphProblem] = ()) -> None:
        super().__init__(message)
        self.problems: Tuple[GraphProblem, ...] = tuple(problems)

    @classmethod
    def from_problems(cls, problems: Sequence[GraphProblem]) -> "GraphConversionError":
        if len(problems) == 1:
            return cls(f"cannot convert: {problems[0].message}", problems)
        by_kind: Dict[str, List[GraphProblem]] = {}
        for p in problems:
            by_kind.setdefault(p.kind, []).append(p)
        parts = []
        for kind, ps in by_kind.items():
            where = sorted({p.module or "the top-level forward" for p in ps},
                           key=[p.module or "the top-level forward" for p in ps].index)
            more = f", +{len(where) - 2} more" if len(where) > 2 else ""
            parts.append(f"{kind} x{len(ps)} (in {', '.join(where[:2])}{more})")
        kinds = f"{len(by_kind)} kind" + ("s" if len(by_kind) > 1 else "")
        summary = (f"cannot convert: {len(problems)} unsupported operations of {kinds}: "
                   + "; ".join(parts))
        return cls("\n".join([summary] + [f"  {p.message}" for p in problems]), problems)


class ConstantScale(nn.Module, base.StepModule):
    """``x * c`` or ``x / c`` for a constant ``c`` (a number, a parameter or a shape value).

    Elementwise and the same at every step, so it commutes with the time mean; as a module it
    passes SpikingJelly's step-mode adapter, which knows no division.
    """

    def __init__(self, divide: bool, factor: Optional[float] = None, step_mode: str = "s"):
        super().__init__()
        self.divide = bool(divide)
        self.factor = factor
        self.step_mode = step_mode

    def supported_step_mode(self):
        return ("s", "m")

    def forward(self, x: torch.Tensor, factor=None) -> torch.Tensor:
        c = self.factor if factor is None else factor
        return x / c if self.divide else x * c

    def extra_repr(self) -> str:
        op = "/" if self.divide else "*"
        return f"x {op} {'input' if self.factor is None else self.factor}, step_mode={self.step_mode}"


class ChunkPart(nn.Module, base.StepModule):
    """Part ``index`` of ``x.chunk(chunks, dim)`` (ShuffleNet's channel split) as a step module."""

    def __init__(self, chunks: int, index: int, dim: int, step_mode: str = "s"):
        super().__init__()
        self.chunks, self.index, self.dim = int(chunks), int(index), int(dim)
        self.step_mode = step_mode

    def supported_step_mode(self):
        return ("s", "m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return functional.seq_to_ann_forward(x, self._part)
        return self._part(x)

    def _part(self, x: torch.Tensor) -> torch.Tensor:
        return x.chunk(self.chunks, self.dim)[self.index]

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, index={self.index}, dim={self.dim}, step_mode={self.step_mode}"


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
                msg = (f"activation site {name!r} cannot stay analog: spiking site {node.target!r} precedes it, "
                       "so its input changes over time")
                raise GraphConversionError(msg, [GraphProblem(sites[name].name, "analog site", name, msg)])
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
    tgt = node.meta.get("sjpc_written_as", tgt)
    where = f" in module {owner}" if owner else " in the model's own forward"
    return f"graph node '{node.name}' ({node.op} {tgt}){where}"


def _owner_path(node: fx.Node) -> str:
    """Path of the module a node sits in (its own for a module call)."""
    if node.op == "call_module":
        return node.target
    return _owner_prefix(node)


def prepare_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Canonicalise activation sites, module-ise functional ops, reorder pools, then validate."""
    _canonicalise(gm)
    _move_maxpools_after_activations(gm)
    validate_graph(gm)
    _views_to_reshapes(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # Dry-run SpikingJelly's step-mode adapter on a copy so that its rejections, too, come
    # before any calibration work.
    try:
        to_multistep(copy.deepcopy(gm))
    except (ValueError, TypeError) as exc:
        msg = f"SpikingJelly's step-mode adapter rejects this model: {exc}"
        raise GraphConversionError(msg, [GraphProblem("", "step-mode adapter", "", msg)]) from exc
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
            elif (getattr(t, "__name__", "") == "stochastic_depth" and getattr(t, "__module__", "").startswith(
                    "torchvision.ops") and _arg(node, 3, "training") is False):
                # torchvision's stochastic depth traced in eval mode: the identity.
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
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
                # The step-mode adapter has no .contiguous(); dropping it is safe because every
                # .view() becomes a .reshape() (_views_to_reshapes: same values, copies where a
                # view of the now non-contiguous tensor would fail).
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            elif node.target == "relu":
                _to_module_node(gm, node, nn.ReLU(), "relu", node.args[:1])
            elif node.target in ("clamp", "clip"):
                rep = _relu_like(*_clamp_bounds(node))
                if rep is not None:
                    _to_module_node(gm, node, rep, "clamp", node.args[:1])
    _scales_to_modules(gm)
    _chunks_to_modules(gm)
    gm.graph.lint()
    gm.recompile()


def _views_to_reshapes(gm: fx.GraphModule) -> None:
    """``x.view(sizes)`` -> ``x.reshape(sizes)`` (see the ``contiguous`` note in _canonicalise)."""
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "view" and not node.kwargs and not any(
                isinstance(a, torch.dtype) for a in node.args[1:]):
            node.target = "reshape"
            node.meta["sjpc_written_as"] = "view"  # error messages show what the user wrote


def _static_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose value is the same at every time step: parameters, shapes and arithmetic on them."""
    static = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            static.add(node)
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            static.add(node)
        elif node.op == "call_function" and node.target is builtins.getattr:
            static.add(node)
        elif node.op in ("call_function", "call_method") and all(i in static for i in node.all_input_nodes):
            static.add(node)
    return static


def _is_constant(value, static: set) -> bool:
    if isinstance(value, fx.Node):
        return value in static
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scales_to_modules(gm: fx.GraphModule) -> None:
    """``x * c``, ``c * x`` and ``x / c`` with a constant ``c`` become :class:`ConstantScale` modules."""
    static = _static_nodes(gm)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node in static or len(node.args) != 2:
            continue
        target = node.target
        divide = target in (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
        if not (divide or target in (operator.mul, torch.mul, "mul")):
            continue
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
            _to_module_node(gm, node, ConstantScale(divide), "div" if divide else "mul", (x, c))
        else:
            _to_module_node(gm, node, ConstantScale(divide, float(c)), "div" if divide else "mul", (x,))


def _chunks_to_modules(gm: fx.GraphModule) -> None:
    """``a, b = x.chunk(2, dim)`` (dim != 0) becomes one :class:`ChunkPart` module per part used."""
    for node in list(gm.graph.nodes):
        if not ((node.op == "call_method" and node.target == "chunk")
                or (node.op == "call_function" and node.target is torch.chunk)):
            continue
        chunks, dim = _arg(node, 1, "chunks"), _arg(node, 2, "dim", 0)
        users = list(node.users)
        if not (_literal_int(chunks) and _literal_int(dim) and dim != 0 and users and all(
                u.op == "call_function" and u.target is operator.getitem and _literal_int(u.args[1])
                for u in users)):
            continue  # left for validation to report
        for user in users:
            _to_module_node(gm, user, ChunkPart(chunks, user.args[1], dim), f"chunk{user.args[1]}",
                            (node.args[0],))
        gm.graph.erase_node(node)


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


def _literal_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spiking_source(node, modules) -> bool:
    """True when ``node`` carries sorted spike trains with one spike value per channel.

    Activation sites produce such trains; Dropout/Identity and max pools keep them, and so does a
    concatenation along the channel axis of such trains (every channel still comes from one
    neuron population), which is what Inception and Fire modules feed into their pools.
    """
    if not isinstance(node, fx.Node):
        return False
    if is_activation_site(node, modules):
        return True
    if node.op == "call_module" and isinstance(modules.get(node.target), _MAXPOOL_MODULES + (nn.Dropout, nn.Identity)):
        return _spiking_source(node.args[0], modules)
    if node.op == "call_function" and node.target is torch.cat:
        tensors = _arg(node, 0, "tensors")
        # Only the literal channel axis: a negative axis could be a spatial one, where a pool
        # window would mix trains of different spike values.
        return (_arg(node, 1, "dim", 0) == 1 and isinstance(tensors, (list, tuple)) and len(tensors) > 0
                and all(_spiking_source(t, modules) for t in tensors))
    return False


# Kinds of values flowing through the graph, for the checks below.
_TENSOR = "tensor"    # per-sample data with the batch on axis 0
_STATIC = "static"    # shapes, Python numbers, parameters: the same at every time step
_BATCH = "batch"      # the batch size (x.size(0), x.shape[0]): a static value reshapes may start with
_UNKNOWN = "unknown"  # the result of an unsupported node: not checked further

_SHAPE_METHODS = {"size", "dim"}
_BATCH_AXIS_HINT = ("a converted network runs T time steps through the batch axis, so an operation "
                    "on the batch axis (axis 0) mixes samples with time steps")


def _dims(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _touches_batch(dims) -> Optional[bool]:
    """True when a literal dim list names axis 0; None when a dim is not a literal int."""
    dims = _dims(dims)
    if not all(_literal_int(d) for d in dims):
        return None
    return any(d == 0 for d in dims)


def _batch_axis_problem(node: fx.Node, kinds: Dict[fx.Node, str]) -> Optional[str]:
    """Why ``node`` (an op on a per-sample tensor) touches the batch axis, or None."""
    op = node.target
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    if name in ("mean",):
        dim = _arg(node, 1, "dim")
        if dim is None:
            return "mean over all axes includes the batch axis"
        hit = _touches_batch(dim)
        if hit is None:
            return f"mean over a non-literal dim {dim!r}"
        return "mean over the batch axis" if hit else None
    if name == "transpose":
        hit = _touches_batch([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")])
        if hit is None:
            return "transpose with non-literal dims"
        return "transpose involving the batch axis" if hit else None
    if name == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        dims = list(dims) or _dims(node.kwargs.get("dims", []))
        if not dims or not all(_literal_int(d) for d in dims):
            return "permute with non-literal dims"
        return None if dims[0] == 0 else "permute that moves the batch axis"
    if name == "unsqueeze":
        dim = _arg(node, 1, "dim")
        if not _literal_int(dim):
            return "unsqueeze with a non-literal dim"
        return "unsqueeze before the batch axis" if dim == 0 else None
    if name == "unflatten":
        dim = _arg(node, 1, "dim")
        if not _literal_int(dim):
            return "unflatten with a non-literal dim"
        return "unflatten of the batch axis" if dim == 0 else None
    if name == "flatten":
        start = _arg(node, 1, "start_dim", 0)
        if not _literal_int(start):
            return "flatten with a non-literal start_dim"
        return "flatten starting at the batch axis" if start == 0 else None
    if name == "cat":
        dim = _arg(node, 1, "dim", 0)
        if not _literal_int(dim):
            return "concatenation along a non-literal dim"
        return "concatenation along the batch axis" if dim == 0 else None
    if name in ("view", "reshape", "expand"):
        sizes = list(node.args[1:])
        if name == "reshape" and node.op == "call_function":
            sizes = [_arg(node, 1, "shape")]
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
        return kinds.get(node.args[0]) == _TENSOR and _arg(node, 1, "dim") == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_method" and src.target == "size" and len(src.args) == 1 and not src.kwargs)
            or (src.op == "call_function" and src.target is builtins.getattr and src.args[1] == "shape"))
    return False


_TENSOR_FUNCTIONS = {torch.cat, torch.flatten, torch.reshape, torch.mean, torch.transpose, torch.unsqueeze,
                     torch.permute, operator.getitem}
_AFFINE_FUNCTIONS = {operator.add, torch.add, operator.sub, torch.sub, operator.neg, torch.neg, operator.pos}
_TENSOR_METHODS = {"view", "reshape", "flatten", "mean", "permute", "transpose", "unsqueeze", "unflatten",
                   "expand", "add", "sub", "neg"}


def _check_node(node: fx.Node, modules: Dict[str, nn.Module], kinds: Dict[fx.Node, str]):
    """``(value kind, problem kind or None, reason)`` of one node."""
    if node.op == "placeholder":
        return _TENSOR, None, ""
    if node.op == "get_attr":
        return _STATIC, None, ""
    inputs = [kinds.get(i, _STATIC) for i in node.all_input_nodes]
    data = [k for k in inputs if k in (_TENSOR, _UNKNOWN)]
    unknown = _UNKNOWN in data
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, _MAXPOOL_MODULES):
            if getattr(mod, "return_indices", False):
                return _UNKNOWN, "max pooling with return_indices", "max pooling with return_indices is not supported"
            if not unknown and not _spiking_source(node.args[0], modules):
                return _TENSOR, "max pooling of currents", (
                    "max pooling of analog currents is not exact in a spiking network (the time mean of a "
                    "max is not the max of the time mean); place the pool directly after an activation "
                    "or a channel concatenation of activations")
            return _TENSOR, None, ""
        if isinstance(mod, nn.Flatten) and mod.start_dim == 0:
            return _TENSOR, "batch axis", f"Flatten(start_dim=0) flattens the batch axis; {_BATCH_AXIS_HINT}"
        if isinstance(mod, ACTIVATION_TYPES + _LINEAR_MODULES + (StepPad, base.StepModule, base.MemoryModule)):
            return _TENSOR, None, ""
        kind = f"module {type(mod).__name__}"
        return _UNKNOWN, kind, (
            f"module type {type(mod).__name__} is not supported by parallel conversion (only linear "
            "layers, pooling, padding, reshaping, residual additions, concatenation and ReLU/QCFS-family "
            "activations are)")
    if node.op not in ("call_function", "call_method"):
        return (_UNKNOWN if unknown else _TENSOR) if data else _STATIC, None, ""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    if not data:
        # Shape arithmetic, asserts on shapes, parameters: the same at every step.
        return (_BATCH if _is_batch_size(node, kinds) else _STATIC), None, ""
    if node.op == "call_method" and target in _SHAPE_METHODS or target is builtins.getattr:
        return (_BATCH if _is_batch_size(node, kinds) else _STATIC), None, ""
    result = _UNKNOWN if unknown else _TENSOR
    if target is operator.getitem and kinds.get(node.args[0]) == _UNKNOWN:
        return _UNKNOWN, None, ""  # e.g. one output of an unsupported module returning a tuple
    supported = (target in _TENSOR_FUNCTIONS or target in _AFFINE_FUNCTIONS or hasattr(target, "_fields")
                 if node.op == "call_function" else target in _TENSOR_METHODS)
    if target in _SCALE_FUNCTIONS or target in _SCALE_METHODS or target in (operator.floordiv, torch.floor_divide):
        # Scaling by a constant became a ConstantScale module in _canonicalise; what is left
        # multiplies two tensors, divides by a tensor, or rounds.
        operands = [a for a in node.args if isinstance(a, fx.Node) and kinds.get(a) in (_TENSOR, _UNKNOWN)]
        if len(operands) > 1:  # h * h: one input node, two tensor operands
            return result, "product of tensors", "the product of two tensors does not commute with the time mean"
        return result, f"function {name}", f"{name} by a tensor or with rounding is not linear"
    if name == "chunk":
        return _UNKNOWN, "batch axis", (
            "chunk along the batch axis, along a non-literal dim, or used other than by indexing its "
            f"parts; {_BATCH_AXIS_HINT}")
    if not supported:
        what = f"function {name}" if node.op == "call_function" else f"method .{name}()"
        reason = (f"function {name} is not supported by parallel conversion" if node.op == "call_function"
                  else f"tensor method .{name}() is not supported by parallel conversion")
        return result, what, reason
    if not unknown:
        why = _batch_axis_problem(node, kinds)
        if why is not None:
            return result, "batch axis", f"{why}; {_BATCH_AXIS_HINT}"
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
        if problem is not None:
            problems.append(GraphProblem(node.name, problem, _owner_path(node), f"{describe(node)}: {reason}"))
    if problems:
        raise GraphConversionError.from_problems(problems)


def _value_kinds(gm: fx.GraphModule) -> Dict[fx.Node, str]:
    modules = dict(gm.named_modules())
    kinds: Dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "output":
            kinds[node] = _check_node(node, modules, kinds)[0]
    return kinds


class _BatchAxisChecker(fx.Interpreter):
    """Runs a prepared graph and records per-sample tensors whose axis 0 is not the batch."""

    def __init__(self, gm: fx.GraphModule, batch: int):
        super().__init__(gm)
        self.batch = batch
        self.kinds = _value_kinds(gm)
        self.problems: List[GraphProblem] = []

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if (self.kinds.get(n) == _TENSOR and n.op != "placeholder" and torch.is_tensor(out)
                and (out.dim() == 0 or out.shape[0] != self.batch)):
            shape = tuple(out.shape)
            self.problems.append(GraphProblem(
                n.name, "batch axis", _owner_path(n),
                f"{describe(n)}: turns a batch of {self.batch} into shape {shape}; {_BATCH_AXIS_HINT}"))
        return out


def check_batch_axis(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Run ``gm`` on (at least) two images of ``x`` and refuse any op that changes the batch axis.

    The static check in :func:`validate_graph` does not know shapes, so it takes a leading ``-1``
    in a reshape and negative axes on trust; this catches those where they do reach the batch
    axis, before calibration. Raises :class:`GraphConversionError` listing every such node.
    """
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"check_batch_axis expects a batch tensor [N, ...], got {getattr(x, 'shape', type(x))}")
    # Two different images (the first one and its negation where the batch has one): a batch of 1
    # would hide an op that merges the batch into another axis.
    x = x[:3] if x.shape[0] >= 2 else torch.cat([x[:1], -x[:1]])
    where = next((t.device for t in gm.parameters()), None) or next((t.device for t in gm.buffers()), x.device)
    checker = _BatchAxisChecker(gm, x.shape[0])
    with torch.no_grad():
        checker.run(x.to(where))
    if checker.problems:
        raise GraphConversionError.from_problems(checker.problems)
