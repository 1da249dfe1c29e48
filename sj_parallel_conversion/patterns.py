"""The module and function patterns parallel conversion knows, kept as data.

Parallel conversion is exact when everything between two neurons commutes with the time mean
(:doc:`limits`). Which modules, functions and tensor methods do, what a converted network runs
in their place and what a saved network may hold is one table here, as ``torch.ao.quantization``
keeps its module mappings, and every pass reads it:

* validation (:mod:`~.validation`) accepts exactly the patterns whose :attr:`ModulePattern.accepted`
  / :attr:`FunctionPattern.accepted` is true, and names a refused pattern's reason;
* canonicalisation (:mod:`~.canonicalise`) replaces the patterns with a ``becomes`` entry;
* multi-step wrapping (:mod:`~.multistep`) hands SpikingJelly's step-mode adapter the ``twin`` of
  every wrapped module;
* saving (:mod:`~.serialization`) allows exactly the :attr:`~ModulePattern.savable` patterns;
* memory reuse (:mod:`~.reuse`) and spike statistics (:mod:`~.stats`, :mod:`~.layerwise`) read
  ``fresh`` and ``spikes``.

:func:`table_rst` writes the table as reST (``python tools/patterns_table.py`` writes
``docs/patterns_table.inc``, which :doc:`limits` includes; ``tests/test_patterns.py`` checks the
file is current).
"""
from __future__ import annotations

import builtins
import dataclasses
import operator
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer

from .activation import DAQCFS, QCFS, ClipReLU
from .joins import TimeMean
from .neuron import ParallelConversionNode
from .reuse import accumulate
from .step_modules import AnalogReLU, ChunkPart, ConstantScale, StepPad

__all__ = [
    "ModulePattern", "FunctionPattern", "MODULE_PATTERNS", "FUNCTION_PATTERNS", "METHOD_PATTERNS",
    "module_pattern", "function_pattern", "method_pattern", "module_types", "table_rst",
]

# -- vocabulary ------------------------------------------------------------------------------------
# time_mean: may the operation be applied to the time mean of its input (the count domain)?
COMMUTES = "commutes"              # linear or affine, the same at every step
ON_SPIKES = "on spike trains"      # exact on sorted trains of one spike value per channel only
NEURON = "becomes a neuron"        # an activation site: a ParallelConversionNode takes its place
CONSTANT_INPUT = "constant input"  # exact only where its input is the same at every step
NO = "no"                          # non-linear in time: the mean of the output is not the output of the mean

# multistep: what a converted (multi-step) network runs in its place
WRAPPED = "wrapped"          # SpikingJelly's step-mode adapter swaps in ``twin``
STEP = "step module"         # a SpikingJelly step module already; runs [T, N, ...] itself
AS_IS = "as is"              # elementwise: runs on [T, N, ...] unchanged
ADAPTER = "adapter"          # a function or method SpikingJelly's adapter rewrites into a step module
CANONICAL = "canonicalised"  # replaced before validation by ``becomes``
REPLACED = "neuron"          # calibration replaces it by a ParallelConversionNode

# spikes: how spike statistics carry spike counts through it (None: counted as nonzero values)
SYNAPSE = "synapse"  # consumes spikes, makes currents: synaptic operations are counted here
SAME = "same"        # every entry keeps its spikes (per-channel scale and shift, identity)
WINDOW = "window"    # sums the spikes of a window (average pools)
PAD = "pad"          # padded entries carry none
MOVE = "move"        # moves or copies entries (max pool of sorted trains, reshapes, chunks)
SUM = "sum"          # adds the spikes of its operands
CAT = "cat"          # joins the spikes of its operands
MEAN = "mean"        # a mean of spikes: their sum, scaled into the next weights
TRAIN = "train"      # gathers a whole train into one step (per-layer-T join)


@dataclasses.dataclass(frozen=True)
class ModulePattern:
    """What parallel conversion does with one module type.

    ``role``: what it is (``"synaptic"``, ``"activation site"``, ``"normalisation"``, ...);
    ``time_mean``: whether it commutes with the time mean (``"commutes"``, ``"on spike trains"``,
    ``"becomes a neuron"``, ``"constant input"``, ``"no"``); ``multistep``: what the converted
    network runs in its place (``"wrapped"`` into ``twin`` by SpikingJelly's step-mode adapter, a
    ``"step module"`` itself, ``"as is"``, ``"neuron"``, ``"canonicalised"`` into ``becomes``, or
    ``None``: no multi-step form); ``in_ann``: may appear in the ANN given to conversion (False
    for what conversion itself writes); ``keeps_spikes``: passes sorted spike trains on (a max
    pool after it is exact); ``fresh``: its output is a new tensor nobody else holds (memory
    reuse may overwrite it); ``spikes``: how spike statistics count spikes through it; ``why``:
    the reason, shown when validation refuses it; ``folds_into``: the module type it is folded
    into when it follows one (BatchNorm into a convolution, :func:`~.tracing.fold_bn`);
    ``mean_identity``: on time means (the count domain, :func:`~.count_domain_model`) it is the
    identity.
    """

    module: type
    role: str
    time_mean: str
    multistep: Optional[str]
    twin: Optional[type] = None
    becomes: Optional[type] = None
    in_ann: bool = True
    keeps_spikes: bool = False
    fresh: bool = False
    spikes: Optional[str] = None
    why: str = ""
    folds_into: Optional[type] = None
    mean_identity: bool = False

    @property
    def accepted(self) -> bool:
        """Validation accepts it in a model's canonical graph."""
        return (self.in_ann and self.time_mean != NO
                and self.multistep in (WRAPPED, STEP, AS_IS, REPLACED))

    @property
    def converts(self) -> bool:
        """A model holding it converts (conditions such as a Hardtanh's bounds aside)."""
        return self.accepted or (self.multistep == CANONICAL and self.becomes is not None)

    @property
    def savable(self) -> bool:
        """:func:`~.save_snn` may write it and :func:`~.load_snn` rebuild it."""
        return self.role == "container" or (
            self.time_mean != NO and self.multistep in (WRAPPED, STEP, AS_IS, REPLACED))


@dataclasses.dataclass(frozen=True)
class FunctionPattern:
    """What parallel conversion does with one function (``target`` a callable) or tensor method
    (``target`` its name).

    ``time_mean`` and ``role`` as for :class:`ModulePattern`, for per-sample tensor operands;
    ``multistep``: ``"as is"`` (elementwise on ``[T, N, ...]``), ``"adapter"`` (SpikingJelly's
    step-mode adapter rewrites it into a step module), ``"canonicalised"`` (into ``becomes``, a
    module type, a function or a method name) or ``None``; ``batch_axis``: its axis arguments are
    checked not to reach the batch axis, through which a converted network runs its time steps;
    ``static``: allowed on shape values (``x.size(1) // 2``), which SpikingJelly's adapter passes
    on; ``in_ann``: may appear in the ANN's graph (False for what conversion writes); ``fresh``,
    ``spikes`` and ``why`` as for :class:`ModulePattern`.
    """

    target: Union[Callable, str]
    role: str
    time_mean: str
    multistep: Optional[str]
    becomes: Union[type, Callable, str, None] = None
    batch_axis: bool = False
    static: bool = False
    in_ann: bool = True
    fresh: bool = False
    spikes: Optional[str] = None
    why: str = ""

    @property
    def is_method(self) -> bool:
        return isinstance(self.target, str)

    @property
    def name(self) -> str:
        """How an error message names it: ``function cat``, ``method .view()``."""
        if self.is_method:
            return f"method .{self.target}()"
        return f"function {getattr(self.target, '__name__', repr(self.target))}"

    @property
    def accepted(self) -> bool:
        """Validation accepts it on per-sample tensors in a canonical graph."""
        return self.in_ann and self.time_mean == COMMUTES and self.multistep in (AS_IS, ADAPTER)

    @property
    def converts(self) -> bool:
        return self.accepted or (self.multistep == CANONICAL and self.becomes is not None)

    @property
    def savable(self) -> bool:
        """A saved graph may call it (on tensors where accepted, on shape values where static)."""
        return (self.time_mean == COMMUTES and self.multistep in (AS_IS, ADAPTER)) or self.static


def _m(modules: Iterable[type], role: str, time_mean: str, multistep: Optional[str], twins=None,
       **kw) -> Tuple[ModulePattern, ...]:
    """One pattern per type of ``modules``, the ``twins`` (SpikingJelly layers) in the same order."""
    modules = tuple(modules)
    twins = tuple(twins) if twins is not None else (None,) * len(modules)
    return tuple(ModulePattern(m, role, time_mean, multistep, twin=t, **kw) for m, t in zip(modules, twins))


_NORM_WHY = ("normalises each sample by statistics of its own input (per time step in a spiking "
             "network), which is not linear in time, so it does not commute with the time mean")
_NONLINEAR_WHY = "non-linear between neurons: the time mean of its output is not its output at the time mean"
_NO_STEP_WHY = "commutes with the time mean, but conversion has no multi-step form for it"

#: Every module type the converter knows, in the order the docs list them. SpikingJelly's
#: step-mode layers (``twin``) are found by :func:`module_pattern` as the pattern they stand for.
MODULE_PATTERNS: Tuple[ModulePattern, ...] = (
    # synaptic: weighted sums of their inputs
    *_m((nn.Conv1d, nn.Conv2d, nn.Conv3d), "synaptic", COMMUTES, WRAPPED,
        (layer.Conv1d, layer.Conv2d, layer.Conv3d), fresh=True, spikes=SYNAPSE),
    *_m((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "synaptic", COMMUTES, WRAPPED,
        (layer.ConvTranspose1d, layer.ConvTranspose2d, layer.ConvTranspose3d)),
    ModulePattern(nn.Linear, "synaptic", COMMUTES, WRAPPED, twin=layer.Linear, fresh=True, spikes=SYNAPSE),
    # per-channel scale and shift (eval mode), constant scaling
    *(ModulePattern(bn, "affine", COMMUTES, WRAPPED, twin=twin, fresh=True, spikes=SAME, folds_into=conv)
      for bn, twin, conv in ((nn.BatchNorm1d, layer.BatchNorm1d, nn.Conv1d), (nn.BatchNorm2d, layer.BatchNorm2d, nn.Conv2d),
                             (nn.BatchNorm3d, layer.BatchNorm3d, nn.Conv3d))),
    ModulePattern(ConstantScale, "affine", COMMUTES, STEP, spikes=SAME),
    # pooling
    *_m((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveAvgPool3d), "average pool", COMMUTES, WRAPPED,
        (layer.AvgPool1d, layer.AvgPool2d, layer.AvgPool3d, layer.AdaptiveAvgPool1d, layer.AdaptiveAvgPool2d,
         layer.AdaptiveAvgPool3d), fresh=True, spikes=WINDOW),
    *_m((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "max pool", ON_SPIKES, WRAPPED,
        (layer.MaxPool1d, layer.MaxPool2d, layer.MaxPool3d), keeps_spikes=True, spikes=MOVE),
    *_m((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), "max pool", ON_SPIKES, None,
        why="conversion has no multi-step form for it (nn.MaxPool2d has one)"),
    # resampling: interpolation weights are fixed, so every mode is linear in the input
    ModulePattern(nn.Upsample, "resample", COMMUTES, WRAPPED, twin=layer.Upsample, fresh=True),
    # shape, padding, identity
    ModulePattern(nn.Flatten, "shape", COMMUTES, WRAPPED, twin=layer.Flatten, spikes=MOVE),
    ModulePattern(ChunkPart, "shape", COMMUTES, STEP, spikes=MOVE),
    *_m((nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle), "shape", COMMUTES, None,
        why=_NO_STEP_WHY),
    ModulePattern(StepPad, "pad", COMMUTES, STEP, spikes=PAD),
    *_m((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
        "pad", COMMUTES, CANONICAL, becomes=StepPad),
    *_m((nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d), "pad", COMMUTES,
        None, why=_NO_STEP_WHY + " (constant padding has: nn.ZeroPad2d, F.pad)"),
    *_m((nn.Dropout, nn.Dropout2d), "identity", COMMUTES, WRAPPED, (layer.Dropout, layer.Dropout2d),
        keeps_spikes=True, spikes=SAME),
    ModulePattern(nn.Identity, "identity", COMMUTES, AS_IS, keeps_spikes=True, spikes=SAME),
    # activation sites: a neuron takes their place
    *_m((nn.ReLU, ClipReLU, QCFS, DAQCFS), "activation site", NEURON, REPLACED),
    ModulePattern(nn.ReLU6, "activation site", NEURON, CANONICAL, becomes=ClipReLU),
    ModulePattern(nn.Hardtanh, "activation site", NEURON, CANONICAL, becomes=ClipReLU,
                  why="a Hardtanh is an activation site only with min_val=0 (a clipped ReLU)"),
    # what conversion writes
    ModulePattern(AnalogReLU, "analog activation", CONSTANT_INPUT, AS_IS, in_ann=False,
                  why="made by conversion (analog_sites=...); give the ANN an nn.ReLU there"),
    ModulePattern(ParallelConversionNode, "neuron", NEURON, STEP, in_ann=False,
                  why="a spiking neuron: the model is converted already"),
    ModulePattern(TimeMean, "join", COMMUTES, STEP, in_ann=False, spikes=TRAIN, mean_identity=True,
                  why="made by conversion (per-layer T joins); in an ANN it would average the batch"),
    # refused: not linear in time
    *_m((nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
         nn.LocalResponseNorm), "normalisation", NO, None, why=_NORM_WHY),
    *_m((nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU,
         nn.ELU, nn.Softmax, nn.MultiheadAttention), "non-linear", NO, None, why=_NONLINEAR_WHY),
    # containers: saved as a tree, their children called by the graph
    *_m((nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict), "container", COMMUTES, None, in_ann=False,
        why="a container is traced through, never called as one operation"),
)


def _f(targets: Iterable, role: str, time_mean: str, multistep: Optional[str], **kw) -> Tuple[FunctionPattern, ...]:
    return tuple(FunctionPattern(t, role, time_mean, multistep, **kw) for t in targets)


_AXIS = dict(time_mean=COMMUTES, multistep=ADAPTER, batch_axis=True)

_LITERAL_POOL = ("only a pool whose sizes are numbers written in the model becomes a module; a size "
                 "computed from a shape (F.avg_pool2d(x, x.size(3))) can be written as its number, or a "
                 "global pool as F.adaptive_avg_pool2d(x, 1) or x.mean((2, 3))")

#: Every function the converter knows (call_function targets).
FUNCTION_PATTERNS: Tuple[FunctionPattern, ...] = (
    # sums (residual connections) and signs: elementwise, on [T, N, ...] as they are
    *_f((operator.add, operator.sub), "sum", COMMUTES, AS_IS, static=True, fresh=True, spikes=SUM),
    *_f((torch.add, torch.sub), "sum", COMMUTES, AS_IS, fresh=True, spikes=SUM),
    FunctionPattern(operator.neg, "sign", COMMUTES, AS_IS, static=True, spikes=SAME),
    FunctionPattern(torch.neg, "sign", COMMUTES, AS_IS, spikes=SAME),
    # scaling: by a constant it becomes ConstantScale; what is left multiplies tensors
    *_f((operator.mul,), "scale", NO, CANONICAL, becomes=ConstantScale, static=True, spikes=SAME,
        why="the product of two tensors does not commute with the time mean"),
    *_f((operator.truediv, torch.mul, torch.div, torch.true_divide), "scale", NO, CANONICAL,
        becomes=ConstantScale, spikes=SAME, why="division by a tensor or with rounding is not linear"),
    FunctionPattern(operator.floordiv, "rounding", NO, None, static=True, why="rounding is not linear"),
    FunctionPattern(torch.floor_divide, "rounding", NO, None, why="rounding is not linear"),
    # shape arithmetic: the same at every step
    FunctionPattern(operator.eq, "shape arithmetic", NO, None, static=True),
    FunctionPattern(builtins.getattr, "shape arithmetic", COMMUTES, ADAPTER, static=True),
    # reshaping and joining, as long as the batch axis stays
    FunctionPattern(operator.getitem, "shape", static=True, spikes=MOVE, **_AXIS),
    FunctionPattern(torch.cat, "join", fresh=True, spikes=CAT, **_AXIS),
    *_f((torch.flatten, torch.reshape, torch.transpose, torch.unsqueeze), "shape", spikes=MOVE, **_AXIS),
    FunctionPattern(torch.mean, "average pool", spikes=MEAN, **_AXIS),
    FunctionPattern(torch.permute, "shape", COMMUTES, CANONICAL, becomes="permute"),
    FunctionPattern(torch.chunk, "shape", COMMUTES, CANONICAL, becomes=ChunkPart),
    # functional forms of modules
    *_f((F.relu, F.relu_, torch.relu, torch.relu_), "activation site", NEURON, CANONICAL, becomes=nn.ReLU),
    FunctionPattern(F.relu6, "activation site", NEURON, CANONICAL, becomes=ClipReLU),
    *_f((torch.clamp, torch.clip, F.hardtanh), "activation site", NEURON, CANONICAL, becomes=ClipReLU,
        why="a clamp is an activation site only with lower bound 0 (a clipped ReLU)"),
    FunctionPattern(F.pad, "pad", COMMUTES, CANONICAL, becomes=StepPad,
                    why="only constant padding with a literal pad becomes a step module"),
    FunctionPattern(F.dropout, "identity", COMMUTES, CANONICAL, becomes=nn.Dropout),
    FunctionPattern(F.adaptive_avg_pool2d, "average pool", COMMUTES, CANONICAL, becomes=nn.AdaptiveAvgPool2d,
                    why=_LITERAL_POOL),
    FunctionPattern(F.avg_pool2d, "average pool", COMMUTES, CANONICAL, becomes=nn.AvgPool2d, why=_LITERAL_POOL),
    FunctionPattern(F.max_pool2d, "max pool", ON_SPIKES, CANONICAL, becomes=nn.MaxPool2d,
                    why=_LITERAL_POOL + ", and max pooling without return_indices"),
    FunctionPattern(F.interpolate, "resample", COMMUTES, CANONICAL, becomes=nn.Upsample,
                    why="only an interpolation with literal sizes or scale factors becomes nn.Upsample"),
    # what conversion writes
    # accumulate returns its first operand, which memory reuse only passes when that operand is a
    # temporary read by nobody else, or a new tensor: either way a tensor only its readers see.
    FunctionPattern(accumulate, "sum", COMMUTES, AS_IS, in_ann=False, fresh=True, spikes=SUM,
                    why="made by memory reuse: a sum written into its first operand"),
)

#: Every tensor method the converter knows (call_method targets).
METHOD_PATTERNS: Tuple[FunctionPattern, ...] = (
    *_f(("size", "dim"), "shape arithmetic", COMMUTES, ADAPTER, static=True),
    *_f(("view", "reshape", "flatten", "permute", "transpose", "unsqueeze", "unflatten", "expand"), "shape",
        spikes=MOVE, **_AXIS),
    FunctionPattern("mean", "average pool", spikes=MEAN, **_AXIS),
    FunctionPattern("chunk", "shape", COMMUTES, CANONICAL, becomes=ChunkPart),
    FunctionPattern("contiguous", "identity", COMMUTES, CANONICAL, becomes="identity"),
    FunctionPattern("add", "sum", COMMUTES, CANONICAL, becomes=operator.add),
    FunctionPattern("sub", "sum", COMMUTES, CANONICAL, becomes=operator.sub),
    FunctionPattern("neg", "sign", COMMUTES, CANONICAL, becomes=operator.neg),
    *_f(("mul", "div", "true_divide"), "scale", NO, CANONICAL, becomes=ConstantScale,
        why="the product of two tensors does not commute with the time mean"),
    FunctionPattern("relu", "activation site", NEURON, CANONICAL, becomes=nn.ReLU),
    *_f(("clamp", "clip"), "activation site", NEURON, CANONICAL, becomes=ClipReLU,
        why="a clamp is an activation site only with lower bound 0 (a clipped ReLU)"),
)

_BY_MODULE: Dict[type, ModulePattern] = {}
for _p in MODULE_PATTERNS:
    _BY_MODULE[_p.module] = _p
    if _p.twin is not None:
        _BY_MODULE[_p.twin] = _p
_BY_FUNCTION: Dict[Callable, FunctionPattern] = {p.target: p for p in FUNCTION_PATTERNS}
_BY_METHOD: Dict[str, FunctionPattern] = {p.target: p for p in METHOD_PATTERNS}


def module_pattern(module: Union[nn.Module, type]) -> Optional[ModulePattern]:
    """The pattern of a module (or module type), or ``None`` when the table does not know it.

    Exact types, and SpikingJelly's step-mode layers as the pattern they are the twin of. A
    subclass stands for its base only where conversion replaces it (by the base's twin or a
    neuron) and it keeps the base's ``forward``: a subclass that computes something else would
    otherwise be converted as its base.
    """
    cls = module if isinstance(module, type) else type(module)
    found = _BY_MODULE.get(cls)
    if found is not None:
        return found
    for base in cls.__mro__[1:]:
        found = _BY_MODULE.get(base)
        if found is not None:
            same = getattr(cls, "forward", None) is getattr(base, "forward", None)
            return found if same and found.multistep in (WRAPPED, REPLACED) and found.in_ann else None
    return None


def function_pattern(target: Callable) -> Optional[FunctionPattern]:
    """The pattern of a ``call_function`` target, or ``None``."""
    try:
        return _BY_FUNCTION.get(target)
    except TypeError:  # an unhashable target
        return None


def method_pattern(name: str) -> Optional[FunctionPattern]:
    """The pattern of a ``call_method`` target (a tensor method's name), or ``None``."""
    return _BY_METHOD.get(name) if isinstance(name, str) else None


def module_types(select: Callable[[ModulePattern], bool], twins: bool = True) -> Tuple[type, ...]:
    """The module types (and, with ``twins``, their SpikingJelly twins) of the patterns ``select`` picks."""
    out = []
    for p in MODULE_PATTERNS:
        if select(p):
            out.append(p.module)
            if twins and p.twin is not None:
                out.append(p.twin)
    return tuple(out)


def function_targets(select: Callable[[FunctionPattern], bool]) -> Tuple:
    """The function targets and method names of the patterns ``select`` picks."""
    return tuple(p.target for p in FUNCTION_PATTERNS + METHOD_PATTERNS if select(p))


# -- the table as documentation --------------------------------------------------------------------
def _type_name(t) -> str:
    if isinstance(t, str):
        return f"``.{t}()``" if t != "identity" else "(removed)"
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
    if mod.startswith("torch.nn.functional"):
        return f"``F.{name}``"
    if mod.startswith("torch.nn"):
        return f"``nn.{name}``"
    if mod.startswith("spikingjelly"):
        return f"``layer.{name}``"
    if mod.startswith("sj_parallel_conversion"):
        return f"``{name}``"
    if mod in ("_operator", "operator"):
        return f"``operator.{name}``"
    if mod == "builtins":
        return f"``{name}``"
    return f"``torch.{name}``"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def table_rst() -> str:
    """The table as reST list-tables (modules, then functions and methods)."""
    lines = [".. This file is written by `python tools/patterns_table.py` from sj_parallel_conversion.patterns;",
             "   tests/test_patterns.py checks it is current. Do not edit by hand.", "",
             ".. list-table:: Modules", "   :header-rows: 1", "",
             "   * - module", "     - role", "     - time mean", "     - in the converted network",
             "     - converts", "     - saved", "     - note"]
    for p in MODULE_PATTERNS:
        if p.multistep == WRAPPED:
            runs = _type_name(p.twin)
        elif p.multistep == CANONICAL:
            runs = f"becomes {_type_name(p.becomes)}"
        elif p.multistep == REPLACED:
            runs = "``ParallelConversionNode``"
        else:
            runs = p.multistep or "none"
        lines += [f"   * - {_type_name(p.module)}", f"     - {p.role}", f"     - {p.time_mean}",
                  f"     - {runs}", f"     - {_yes(p.converts)}", f"     - {_yes(p.savable)}", f"     - {p.why}"]
    lines += ["", ".. list-table:: Functions and tensor methods", "   :header-rows: 1", "",
              "   * - function", "     - role", "     - time mean", "     - in the converted network",
              "     - on tensors", "     - on shape values", "     - saved", "     - note"]
    for p in FUNCTION_PATTERNS + METHOD_PATTERNS:
        runs = {AS_IS: "as is", ADAPTER: "SpikingJelly step module"}.get(p.multistep, "none")
        if p.multistep == CANONICAL:
            runs = f"becomes {_type_name(p.becomes)}"
        why = "; ".join(filter(None, [p.why, "axes checked for the batch axis" if p.batch_axis else ""]))
        lines += [f"   * - {_type_name(p.target)}", f"     - {p.role}", f"     - {p.time_mean}",
                  f"     - {runs}", f"     - {_yes(p.converts)}", f"     - {_yes(p.static)}",
                  f"     - {_yes(p.savable)}", f"     - {why}"]
    return "\n".join(line.rstrip() for line in lines) + "\n"
