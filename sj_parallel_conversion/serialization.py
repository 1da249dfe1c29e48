"""Saving and loading converted networks without pickle: :func:`save_snn` / :func:`load_snn`.

A converted network is a ``torch.fx.GraphModule`` whose leaves are SpikingJelly step modules,
:class:`~sj_parallel_conversion.ParallelConversionNode` and a few others. The file describes it
with tensors and plain containers only (so ``torch.load(weights_only=True)`` reads it and a
crafted file cannot run code):

* ``modules``: every module of the tree, by path, as a name from an allowlist
  (:data:`SAVABLE_MODULES`) and its constructor arguments read from the module's attributes;
* ``graph``: the fx graph, node by node, with function targets named from an allowlist
  (:data:`SAVABLE_FUNCTIONS`) and method targets from :data:`SAVABLE_METHODS`;
* ``state_dict``: the weights, thresholds and the neurons' extra state (``T``, spike order,
  channel axis).

Loading rebuilds the tree from the allowlist, the graph node by node, and loads the state
strictly: no ANN, data or calibration is needed. Every string of the file that could reach
``torch.fx`` code generation is checked before the graph is built (:func:`_build`): node ops come
from a fixed set, node names and placeholder targets are Python identifiers, ``get_attr`` and
``call_module`` targets are dotted paths of identifiers (or child indices) that resolve to a
parameter, buffer, constant or module of the rebuilt tree, functions, methods and attributes come
from allowlists, keyword names are identifiers and constants and loose buffers are named the
same way. Code is generated only from a graph made of these checked parts, so nothing a file
says runs as code; a file that breaks any rule is refused naming the node or entry. :func:`save_snn` rebuilds the network in memory
before writing and compares it with the original, so a model that would not come back exactly
(an unknown module type, a function outside the allowlist, state a constructor does not restore)
is refused at save time, naming the module or node.
"""
from __future__ import annotations

import builtins
import dataclasses
import inspect
import keyword
import operator
import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import fx

from . import patterns
from .fileio import FileError, load_state, load_tensor_file, save_tensors
from .multistep import step_tensor_op_type
from .network import ConvertedNetwork

__all__ = ["save_snn", "load_snn", "SNN_FORMAT", "SAVABLE_MODULES", "SAVABLE_FUNCTIONS", "SAVABLE_METHODS",
           "SAVABLE_ATTRIBUTES", "GRAPH_OPS"]

SNN_FORMAT = "sj-parallel-conversion/snn-v2"
_HINT = "save converted networks with sj_parallel_conversion.save_snn(model, path)"

# -- allowlists ------------------------------------------------------------------------------------
def _saved_name(cls: type) -> str:
    """The name a file writes for a module type (the names files have always used)."""
    if cls.__module__.startswith("spikingjelly"):
        return f"spikingjelly.layer.{cls.__name__}"
    if cls.__module__.startswith("torch.nn"):
        return f"torch.nn.{cls.__name__}"
    return f"sj_parallel_conversion.{cls.__name__}"


def _function_name(fn: Callable) -> str:
    mod = getattr(fn, "__module__", None) or ""
    if mod in ("_operator", "operator"):
        return f"operator.{fn.__name__}"
    if mod == "builtins":
        return f"builtins.{fn.__name__}"
    if mod.startswith("sj_parallel_conversion"):
        return f"{mod}.{fn.__name__}"
    if mod.startswith("torch.nn.functional"):
        return f"torch.nn.functional.{fn.__name__}"
    return f"torch.{fn.__name__}"


#: Module types :func:`load_snn` may construct, by the name written in the file: the savable
#: patterns of :mod:`~.patterns` and their SpikingJelly twins. Exact types only: a subclass could
#: run other code in ``forward``.
SAVABLE_MODULES: Dict[str, type] = {
    _saved_name(t): t for t in patterns.module_types(lambda p: p.savable)}
# SpikingJelly's step-mode module for tensor operations (flatten, reshape, cat, ...), which it does
# not export: the adapter writes one for each such operation of a converted graph.
SAVABLE_MODULES["spikingjelly.StepModeTensorOp"] = step_tensor_op_type()

#: Functions a graph node may call, by the name written in the file: the savable function patterns.
SAVABLE_FUNCTIONS: Dict[str, Callable] = {
    _function_name(p.target): p.target for p in patterns.FUNCTION_PATTERNS if p.savable}

#: Tensor methods a graph node may call: the savable method patterns.
SAVABLE_METHODS = frozenset(p.target for p in patterns.METHOD_PATTERNS if p.savable)

#: Tensor attributes a ``builtins.getattr`` node may read (traced shape arithmetic).
SAVABLE_ATTRIBUTES = frozenset(("shape", "dtype", "device", "ndim"))

#: The node ops of a saved graph.
GRAPH_OPS = frozenset(("placeholder", "get_attr", "call_module", "call_function", "call_method", "output"))


# -- values inside the graph and constructor arguments ---------------------------------------------
def _encode(value: Any, where: str, fn_names: Dict[int, str]) -> Any:
    """A plain-container form of a node argument or constructor argument (tagged dicts for what
    weights-only loading cannot hold: nodes, functions, slices, Ellipsis, non-string-keyed dicts)."""
    if isinstance(value, fx.Node):
        return {"$node": value.name}
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
        return value
    if isinstance(value, torch.Size):
        return {"$size": [int(v) for v in value]}
    if isinstance(value, torch.Tensor):
        return {"$tensor": value.detach().cpu().clone()}
    if isinstance(value, tuple):
        return tuple(_encode(v, where, fn_names) for v in value)
    if isinstance(value, list):
        return [_encode(v, where, fn_names) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[_encode(k, where, fn_names), _encode(v, where, fn_names)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode(v, where, fn_names) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if callable(value) and id(value) in fn_names:
        return {"$fn": fn_names[id(value)]}
    raise ValueError(f"save_snn: {where} holds a {type(value).__name__} ({value!r:.60}), which a saved network "
                     "cannot describe without pickle")


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format)


def _decode(value: Any, nodes: Optional[Dict[str, fx.Node]] = None, where: str = "value",
            tensors: bool = True, functions: bool = True) -> Any:
    """The value :func:`_encode` wrote, checked as it is read: plain values, tuples, lists and the
    tags :func:`_encode` writes, nothing else. ``nodes`` (graph arguments) resolves ``$node``
    tags, ``None`` refuses them; ``tensors`` / ``functions`` allow ``$tensor`` / ``$fn`` (module
    arguments), which a graph node's arguments never hold."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v, nodes, where, tensors, functions) for v in value)
    if not (isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value)), str)):
        raise ValueError(f"{where} holds a {type(value).__name__}, which saved networks do not write")
    (tag, inner), = value.items()
    if tag == "$node":
        if nodes is None or not isinstance(inner, str) or inner not in nodes:
            raise ValueError(f"{where} refers to unknown graph node {inner!r:.80}")
        return nodes[inner]
    if tag == "$size" and isinstance(inner, list) and all(type(v) is int for v in inner):
        return torch.Size(inner)
    if tag == "$tensor" and tensors and torch.is_tensor(inner):
        return inner
    if tag == "$dict" and isinstance(inner, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in inner):
        out = {}
        for k, v in inner:
            if not isinstance(k, (type(None), bool, int, float, str)):
                raise ValueError(f"{where} holds a dict key of type {type(k).__name__}")
            out[k] = _decode(v, nodes, where, tensors, functions)
        return out
    if tag == "$slice" and isinstance(inner, list) and len(inner) == 3:
        return slice(*(_decode(v, nodes, where, tensors, functions) for v in inner))
    if tag == "$ellipsis" and inner is True:
        return Ellipsis
    if tag == "$fn" and functions:
        if not isinstance(inner, str) or inner not in SAVABLE_FUNCTIONS:
            raise ValueError(f"{where}: function {inner!r:.80} is not in the allowlist of saved networks")
        return SAVABLE_FUNCTIONS[inner]
    raise ValueError(f"{where} holds a value tagged {tag!r:.40} that is not allowed there")


# -- names -----------------------------------------------------------------------------------------
# ASCII identifiers only, no dunders: fx pastes node names, placeholder targets, keyword names and
# the parts of attribute paths into the forward's source, and a name of this shape cannot be code.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Child modules may also be named like ``0`` (Sequential) or ``block1-0`` (torchvision's RegNet):
# fx writes such a part as a string literal, ``getattr(m, "block1-0")``, and these characters can
# neither end the literal nor start an escape.
_CHILD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\Z")
_RESERVED = frozenset(("self",))


def _identifier(value: Any, what: str) -> str:
    if not (isinstance(value, str) and _IDENTIFIER.match(value) and not keyword.iskeyword(value)
            and not (value.startswith("__") and value.endswith("__")) and value not in _RESERVED):
        raise ValueError(f"{what} {value!r:.80} is not a plain Python identifier")
    return value


def _dotted(value: Any, what: str, root: bool = False) -> str:
    """Names joined by dots: child module names (identifiers, indices such as ``0``, or with
    ``-``), the last an identifier unless the path names a module; ``''`` only where ``root``."""
    if root and value == "":
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} {value!r:.80} is not a dotted path of names")
    for part in value.split("."):
        if not _CHILD.match(part) or part.startswith("__") or keyword.iskeyword(part):
            raise ValueError(f"{what} {value!r:.80}: part {part!r:.40} is not a plain name")
    return value


# -- describing a model ----------------------------------------------------------------------------
def _type_name(module: nn.Module, path: str) -> str:
    if isinstance(module, fx.GraphModule):
        return "torch.fx.GraphModule"
    for name, cls in SAVABLE_MODULES.items():
        if type(module) is cls:
            return name
    what = f"module {path!r}" if path else "the model"
    raise ValueError(f"save_snn: {what} is a {type(module).__module__}.{type(module).__qualname__}, which saved "
                     "networks do not support (no pickle: only known module types are rebuilt)")


def _ctor_args(module: nn.Module, path: str, fn_names: Dict[int, str]) -> Dict[str, Any]:
    """Constructor arguments read back from the module's attributes of the same names."""
    if type(module) in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict) or isinstance(module, fx.GraphModule):
        return {}  # containers: children are attached by path
    args: Dict[str, Any] = {}
    for p in inspect.signature(type(module).__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if not hasattr(module, p.name):
            if p.default is p.empty:
                raise ValueError(f"save_snn: module {path!r} ({type(module).__name__}) has no attribute "
                                 f"{p.name!r} to rebuild it from")
            continue
        value = getattr(module, p.name)
        own = value is not None and any(value is t for t in (*module._parameters.values(), *module._buffers.values()))
        if isinstance(p.default, bool) and (own or value is None):
            value = value is not None  # ``bias=True`` style flags stored as a parameter or None
        elif own and p.default is not p.empty:
            continue  # the state dict restores it
        args[p.name] = _encode(value, f"module {path!r} argument {p.name!r}", fn_names)
    return args


def _describe(model: nn.Module) -> Dict[str, Any]:
    fn_names = {id(fn): name for name, fn in SAVABLE_FUNCTIONS.items()}
    modules: List[Dict[str, Any]] = []
    for path, m in model.named_modules():
        record = {"path": path, "type": _type_name(m, path), "args": _ctor_args(m, path, fn_names),
                  "training": m.training,
                  "parameters": {n: p.requires_grad for n, p in m._parameters.items() if p is not None},
                  "buffers": [n for n, b in m._buffers.items() if b is not None]}
        modules.append(record)
    graph = None
    if isinstance(model, fx.GraphModule):
        if type(model.graph._codegen) is not fx.graph.CodeGen:
            raise ValueError("save_snn: the graph uses a custom code generator (pytree inputs), which saved "
                             "networks do not support")
        graph = []
        for node in model.graph.nodes:
            where = f"graph node {node.name!r} ({node.op} {node.target})"
            if node.op == "call_function":
                if id(node.target) not in fn_names:
                    raise ValueError(f"save_snn: {where} calls {getattr(node.target, '__module__', '?')}."
                                     f"{getattr(node.target, '__name__', node.target)}, which is not in the "
                                     "allowlist of saved networks")
                target: Any = {"$fn": fn_names[id(node.target)]}
            elif node.op == "call_method":
                if node.target not in SAVABLE_METHODS:
                    raise ValueError(f"save_snn: {where} calls the tensor method {node.target!r}, which is not "
                                     "in the allowlist of saved networks")
                target = node.target
            else:
                target = node.target
            graph.append({"op": node.op, "name": node.name, "target": target,
                          "args": _encode(node.args, where, fn_names),
                          "kwargs": _encode(dict(node.kwargs), where, fn_names)})
    # Tensors held by modules outside their state dict (non-persistent buffers).
    state = model.state_dict()
    loose = {}
    for path, m in model.named_modules():
        for n, b in m._buffers.items():
            key = f"{path}.{n}" if path else n
            if b is not None and key not in state:
                loose[key] = b.detach().cpu().clone()
    # Tensors the graph reads as plain attributes (constants fx made while tracing).
    constants = {}
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "get_attr" and node.target not in state and node.target not in loose:
                owner, _, n = node.target.rpartition(".")
                value = getattr(model.get_submodule(owner), n, None)
                if not torch.is_tensor(value):
                    raise ValueError(f"save_snn: graph node {node.name!r} reads {node.target!r}, a "
                                     f"{type(value).__name__}; only tensors can be saved")
                if n not in model.get_submodule(owner)._parameters:
                    constants[node.target] = value.detach().cpu().clone()
    return {"modules": modules, "graph": graph, "class_name": type(model).__name__,
            "state_dict": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state.items()},
            "loose_buffers": loose, "constants": constants}


# -- rebuilding ------------------------------------------------------------------------------------
_MODULE_KEYS = frozenset(("path", "type", "args", "training", "parameters", "buffers"))
_NODE_KEYS = frozenset(("op", "name", "target", "args", "kwargs"))


def _build_modules(desc: Dict[str, Any], source: str) -> Dict[str, nn.Module]:
    """The module tree, by path, from allowlisted types and checked names."""
    state = desc["state_dict"]
    loose = desc.get("loose_buffers") or {}
    built: Dict[str, nn.Module] = {}
    if not isinstance(desc["modules"], list) or not desc["modules"]:
        raise ValueError(f"{source}: no module list")
    for i, rec in enumerate(desc["modules"]):
        if not isinstance(rec, dict) or set(rec) != _MODULE_KEYS:
            raise ValueError(f"{source}: module record {i} is malformed")
        path = _dotted(rec["path"], f"{source}: module path", root=i == 0)
        type_name = rec["type"]
        if path in built:
            raise ValueError(f"{source}: module {path!r} appears twice")
        if type_name == "torch.fx.GraphModule":
            if path:
                raise ValueError(f"{source}: nested GraphModule at {path!r} is not supported")
            cls: type = nn.Module
        elif isinstance(type_name, str) and type_name in SAVABLE_MODULES:
            cls = SAVABLE_MODULES[type_name]
        else:
            raise ValueError(f"{source}: module {path!r} has type {type_name!r:.80}, which is not in the allowlist "
                             "of saved networks")
        if not isinstance(rec["args"], dict) or not isinstance(rec["training"], bool):
            raise ValueError(f"{source}: module {path!r} record is malformed")
        where = f"{source}: module {path!r} argument"
        args = {_identifier(k, where): _decode(v, None, f"{where} {k!r}") for k, v in rec["args"].items()}
        try:
            m = cls(**args)
        except Exception as exc:  # an allowlisted constructor refusing the file's arguments
            raise ValueError(f"{source}: cannot rebuild module {path!r} ({type_name}): {exc}") from None
        # Drop children the constructor made: the saved tree attaches its own below.
        for child in list(m._modules):
            del m._modules[child]
        params, buffers = rec["parameters"], rec["buffers"]
        if not (isinstance(params, dict) and isinstance(buffers, list)):
            raise ValueError(f"{source}: module {path!r} record is malformed")
        for n, requires_grad in params.items():
            _identifier(n, f"{source}: module {path!r} parameter")
            if not isinstance(requires_grad, bool):
                raise ValueError(f"{source}: module {path!r} parameter {n!r} is malformed")
            if getattr(m, n, None) is None or n not in m._parameters:
                key = f"{path}.{n}" if path else n
                if not torch.is_tensor(state.get(key)):
                    raise ValueError(f"{source}: module {path!r} parameter {n!r} has no tensor in the state")
                m.register_parameter(n, nn.Parameter(torch.empty_like(state[key]), requires_grad=requires_grad))
        # A file from an earlier version may name a buffer as it was then; the module's own
        # _load_from_state_dict renames its state alike.
        renamed = getattr(cls, "RENAMED_STATE", {})
        for n in buffers:
            _identifier(n, f"{source}: module {path!r} buffer")
            n = renamed.get(n, n)
            if n not in m._buffers or m._buffers[n] is None:
                key = f"{path}.{n}" if path else n
                value = state.get(key, loose.get(key))
                if not torch.is_tensor(value):
                    raise ValueError(f"{source}: module {path!r} buffer {n!r} has no tensor in the file")
                m.register_buffer(n, torch.empty_like(value), persistent=key in state)
        m.train(rec["training"])
        if path:
            parent, _, name = path.rpartition(".")
            if parent not in built:
                raise ValueError(f"{source}: module {path!r} comes before its parent")
            built[parent].add_module(name, m)
        built[path] = m
    return built


def _attach_tensors(desc: Dict[str, Any], built: Dict[str, nn.Module], source: str) -> Dict[str, torch.Tensor]:
    """Constants (plain tensor attributes the graph reads) and loose buffers, at checked names."""
    state = desc["state_dict"]
    constants = desc.get("constants") or {}
    loose = desc.get("loose_buffers") or {}
    if not (isinstance(constants, dict) and isinstance(loose, dict)):
        raise ValueError(f"{source}: constants or loose buffers are malformed")
    for key, value in constants.items():
        owner, _, n = _dotted(key, f"{source}: constant").rpartition(".")
        _identifier(n, f"{source}: constant {key!r}: name")
        if owner not in built or not torch.is_tensor(value):
            raise ValueError(f"{source}: constant {key!r} has no owner module or is not a tensor")
        if hasattr(built[owner], n):  # never shadow a method, a child or a member
            raise ValueError(f"{source}: constant {key!r} would replace an attribute of its module")
        setattr(built[owner], n, value)
    for key, value in loose.items():
        owner, _, n = _dotted(key, f"{source}: loose buffer").rpartition(".")
        if owner not in built or n not in dict(built[owner].named_buffers(recurse=False)) or key in state \
                or not torch.is_tensor(value):
            raise ValueError(f"{source}: loose buffer {key!r} is not a declared non-persistent buffer")
        setattr(built[owner], n, value)  # a registered buffer's name: assigns the buffer
    return constants


def _target_kind(built: Dict[str, nn.Module], constants: Dict[str, Any], target: str) -> Optional[str]:
    """What a checked dotted ``target`` names in the rebuilt tree: ``'module'``, ``'tensor'`` or ``None``."""
    if target in built:
        return "module"
    owner, _, n = target.rpartition(".")
    m = built.get(owner)
    if m is not None and (n in dict(m.named_parameters(recurse=False)) or n in dict(m.named_buffers(recurse=False))
                          or target in constants):
        return "tensor"
    return None


def _check_node(rec: Any, built: Dict[str, nn.Module], constants: Dict[str, Any], nodes: Dict[str, fx.Node],
                source: str) -> Tuple[str, Any, tuple, dict, str]:
    """One graph record checked against the rebuilt tree: ``(op, target, args, kwargs, name)``."""
    if not isinstance(rec, dict) or set(rec) != _NODE_KEYS:
        raise ValueError(f"{source}: graph record {len(nodes)} is malformed")
    name = _identifier(rec["name"], f"{source}: graph node name")
    op, target = rec["op"], rec["target"]
    where = f"{source}: graph node {name!r}"
    if name in nodes:
        raise ValueError(f"{where} appears twice")
    if op not in GRAPH_OPS:
        raise ValueError(f"{where} has unknown op {op!r:.80}")
    args = _decode(rec["args"], nodes, f"{where} arguments", tensors=False, functions=False)
    kw = _decode(rec["kwargs"], nodes, f"{where} keyword arguments", tensors=False, functions=False)
    if not isinstance(args, tuple) or not isinstance(kw, dict):
        raise ValueError(f"{where}: arguments are malformed")
    for k in kw:
        _identifier(k, f"{where}: keyword")
    if op == "placeholder":
        _identifier(target, f"{where}: placeholder target")
        if args or kw:
            raise ValueError(f"{where}: placeholders of saved networks take no default value")
    elif op in ("get_attr", "call_module"):
        kind = _target_kind(built, constants, _dotted(target, f"{where}: target"))
        wanted = "module" if op == "call_module" else kind
        if kind is None or kind != wanted:
            raise ValueError(f"{where} ({op}) names {target!r}, which is not a "
                             f"{'module' if op == 'call_module' else 'parameter, buffer, constant or module'} "
                             "of the saved network")
        if op == "get_attr" and (args or kw):
            raise ValueError(f"{where}: get_attr takes no arguments")
    elif op == "call_method":
        if not isinstance(target, str) or target not in SAVABLE_METHODS:
            raise ValueError(f"{where} calls the tensor method {target!r:.80}, which is not in the allowlist of "
                             "saved networks")
        if not args or not isinstance(args[0], fx.Node):
            raise ValueError(f"{where}: a method call needs a graph node to call it on")
    elif op == "call_function":
        target = _decode(target, None, f"{where} target", tensors=False)
        if not callable(target):
            raise ValueError(f"{where}: its target is not a function of the allowlist")
        if target is builtins.getattr and not (len(args) == 2 and isinstance(args[0], fx.Node) and not kw
                                               and args[1] in SAVABLE_ATTRIBUTES):
            raise ValueError(f"{where} reads the attribute {args[1:]!r:.80}; saved networks read only "
                             f"{sorted(SAVABLE_ATTRIBUTES)}")
    else:  # output
        if target != "output" or len(args) != 1 or kw:
            raise ValueError(f"{where}: malformed output node")
    return op, target, args, kw, name


def _build_graph(desc: Dict[str, Any], built: Dict[str, nn.Module], constants: Dict[str, Any],
                 source: str) -> fx.Graph:
    records = desc["graph"]
    if not isinstance(records, list) or not records:
        raise ValueError(f"{source}: the graph is malformed")
    graph = fx.Graph()
    nodes: Dict[str, fx.Node] = {}
    for i, rec in enumerate(records):
        op, target, args, kw, name = _check_node(rec, built, constants, nodes, source)
        if (op == "output") != (i == len(records) - 1):
            raise ValueError(f"{source}: the graph must end with its only output node")
        node = graph.create_node(op, target, args, kw, name=name)
        if node.name != name:  # fx renamed it (a builtin's name, say): the file's own references would break
            raise ValueError(f"{source}: graph node name {name!r} is not usable")
        nodes[name] = node
    graph.lint()
    return graph


def _build(desc: Dict[str, Any], source: str) -> nn.Module:
    """Rebuild a network from its description; every part is checked before use (see the module
    documentation), and code is generated only once the whole graph has passed."""
    state = desc["state_dict"]
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ValueError(f"{source}: the state is not a mapping of names to tensors")
    built = _build_modules(desc, source)
    constants = _attach_tensors(desc, built, source)
    root = built[""]
    if desc["graph"] is not None:
        if desc["modules"][0]["type"] != "torch.fx.GraphModule":
            raise ValueError(f"{source}: a graph needs a GraphModule at the root")
        graph = _build_graph(desc, built, constants, source)
        read = {n.target for n in graph.nodes if n.op == "get_attr"}
        if set(constants) - read:
            raise ValueError(f"{source}: constants {sorted(set(constants) - read)[:4]} are read by no graph node")
        class_name = _identifier(desc.get("class_name", "GraphModule"), f"{source}: class name")
        gm = ConvertedNetwork(root, graph, class_name=class_name)
        # Keep the saved tree itself, in its order (also modules the graph does not call).
        gm._modules.clear()
        for name, child in root.named_children():
            gm.add_module(name, child)
        gm.training = root.training  # not train(): that would reset every child's own mode
        for key in constants:
            # GraphModule registers a plain tensor it copies as a buffer; a constant is no state.
            owner, _, n = key.rpartition(".")
            m = gm.get_submodule(owner)
            if n in dict(m.named_buffers(recurse=False)):
                value = getattr(m, n)
                delattr(m, n)
                setattr(m, n, value)  # no longer a buffer name: a plain attribute again
        root = gm
    elif desc["modules"][0]["type"] == "torch.fx.GraphModule" or desc.get("constants"):
        raise ValueError(f"{source}: a GraphModule or constants without a graph")
    # The same strict loading as for weights files: integer tensors where the network holds
    # floating-point ones are refused, and so are values a module's own checks refuse.
    load_state(root, state, f"{source}: the saved state", "the network it describes")
    return root


def _fingerprint(model: nn.Module) -> Tuple:
    """What a rebuilt model must share with the original: tree, reprs, graph and state layout."""
    mods = tuple((p, type(m).__name__, m.extra_repr(), m.training) for p, m in model.named_modules())
    graph = None
    if isinstance(model, fx.GraphModule):
        graph = tuple((n.op, n.name, str(n.target), str(n.args), str(n.kwargs)) for n in model.graph.nodes)
    # Strides too: a channels_last network computes other bits than the contiguous one load_snn builds.
    state = tuple((k, tuple(v.shape), v.dtype, v.stride()) if torch.is_tensor(v) else (k, repr(v))
                  for k, v in model.state_dict().items())
    return mods, graph, state


# -- public ----------------------------------------------------------------------------------------
def save_snn(model: nn.Module, path: Union[str, "os.PathLike[str]"], metadata: Optional[Dict[str, Any]] = None) -> None:
    """Save a converted network so :func:`load_snn` can rebuild it without the ANN, data or calibration.

    The file holds tensors and plain containers only (see the module documentation) and is
    written atomically (a failed write leaves a previous file intact). ``metadata`` is an optional
    dict of plain values (numbers, strings, lists, dicts) stored alongside, returned by
    :func:`load_snn` as ``model.snn_metadata``.

    Raises ``ValueError`` naming the module or graph node when the model holds something a saved
    network cannot describe (an unknown module type, a function outside the allowlist) or when the
    rebuilt network would differ from ``model``; nothing is written then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_snn expects an nn.Module, got {type(model).__name__}")
    for key, value in model.state_dict().items():
        # Strides, not is_contiguous(): a 1x1 kernel in channels_last counts as contiguous.
        if torch.is_tensor(value) and value.stride() != torch.empty(value.shape, device="meta").stride():
            fix = ("save snn.to(memory_format=torch.contiguous_format) and set channels_last again after loading"
                   if value.dim() in (4, 5) else "make it contiguous (.contiguous()) before saving")
            raise ValueError(
                f"save_snn: state entry {key!r} has strides {value.stride()}, not those of a contiguous tensor "
                f"(channels_last makes such strides); load_snn rebuilds contiguous tensors, with which the "
                f"network computes other bits: {fix}; nothing written to {os.fspath(path)!r}")
    desc = _describe(model)
    fn_names = {id(fn): name for name, fn in SAVABLE_FUNCTIONS.items()}
    meta = _encode(dict(metadata or {}), "metadata", {}) if metadata is not None else None
    report = getattr(model, "calibration_report", None)
    if report is not None and dataclasses.is_dataclass(report):
        try:
            desc["calibration_report"] = _encode(dataclasses.asdict(report), "calibration_report", fn_names)
        except ValueError:
            pass  # a report is informative only; a network without it is still the same network
    rebuilt = _build(desc, "save_snn")
    if _fingerprint(rebuilt) != _fingerprint(model):
        diff = _first_difference(_fingerprint(model), _fingerprint(rebuilt))
        raise ValueError(f"save_snn: the network would not be rebuilt exactly ({diff}); refusing to write {os.fspath(path)!r}")
    save_tensors({"format": SNN_FORMAT, "torch": str(torch.__version__), "metadata": meta, **desc}, path)


def _first_difference(a: Tuple, b: Tuple) -> str:
    for part, xa, xb in zip(("modules", "graph", "state"), a, b):
        if xa != xb:
            for ia, ib in zip(xa or (), xb or ()):
                if ia != ib:
                    return f"{part}: {ia} became {ib}"
            return f"{part}: {len(xa or ())} entries became {len(xb or ())}"
    return "unknown"


def load_snn(path: Union[str, "os.PathLike[str]"], map_location: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Rebuild a network saved by :func:`save_snn` (weights-only loading, no pickle).

    Returns the model in the mode it was saved in (converted networks: eval, multi-step), moved to
    ``map_location`` if given. Raises :class:`FileNotFoundError` or ``ValueError`` (one line naming
    the file) for missing, corrupt or foreign files and for files naming module types or functions
    outside the allowlist.
    """
    p = os.fspath(path)
    blob = load_tensor_file(p, what="SNN file", instead=_HINT)
    if not isinstance(blob, dict) or blob.get("format") != SNN_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        if found == "sj-parallel-conversion/snn-v1":
            raise FileError(f"SNN file {p!r} was written by an earlier version (a state without the network's "
                            "structure); convert the ANN again")
        raise FileError(f"SNN file {p!r} is not a network saved by save_snn / 'sj-parallel convert' "
                        f"(format {found!r}, expected {SNN_FORMAT!r})")
    try:
        model = _build(blob, f"SNN file {p!r}")
        # Plain data returned as data: no nodes or functions.
        meta = blob.get("metadata")
        meta = None if meta is None else _decode(meta, None, f"SNN file {p!r}: metadata", functions=False)
        report = blob.get("calibration_report")
        report = None if report is None else _decode(report, None, f"SNN file {p!r}: calibration report",
                                                     functions=False)
    except ValueError as exc:
        raise FileError(str(exc)) from None
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, AssertionError, SyntaxError) as exc:
        # A crafted or damaged description that failed a check in an unexpected place.
        raise FileError(f"SNN file {p!r} is malformed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                        ) from None
    if meta is not None:
        model.snn_metadata = meta
    if isinstance(report, dict):
        from .selection import CalibrationReport

        try:
            model.calibration_report = CalibrationReport(**report)
        except TypeError:
            pass  # written by another version of the report; the network itself is complete
    if map_location is not None:
        model = model.to(map_location)
    return model
