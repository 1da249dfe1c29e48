"""Any model with its weights from a state_dict file: what the CLI's ``--model NAME --weights FILE`` loads.

``NAME`` is one of

* a zoo name (``resnet20``, ``vgg16``, ..., see :data:`~sj_parallel_conversion.tools.models.MODEL_NAMES`),
* ``torchvision:NAME`` (``torchvision:resnet18``: ``torchvision.models.get_model(NAME, weights=None)``,
  never downloaded), or
* ``MODULE:CALLABLE`` (``mymodels:resnet20``): a factory returning an ``nn.Module``, imported from
  ``PYTHONPATH`` or the working directory.

The weights file is read with ``torch.load(weights_only=True)``. It may hold the state_dict
itself or wrap it under ``state_dict``, ``model`` or ``model_state_dict`` (the usual public
layout ``{"state_dict": ..., "best_prec1": ...}``); ``module.`` prefixes (DataParallel) and
``_orig_mod.`` prefixes (``torch.compile``) are stripped. Whether the weights fit is decided by
``model.load_state_dict(state, strict=True)`` itself (:func:`load_state`): what torch accepts
loads (a BatchNorm saved by an older PyTorch without ``num_batches_tracked``, say), and what it
refuses is reported with its missing and unexpected keys and shape mismatches. Integer tensors
where the model has floating-point weights are refused rather than converted.
"""
from __future__ import annotations

import collections
import copy
import importlib
import os
import sys
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ...fileio import load_state, load_tensor_file

__all__ = ["load_user_model", "build_user_model", "extract_state_dict", "state_dict_mismatch",
           "WRAPPER_KEYS"]

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def build_user_model(spec: str, **kwargs: Any) -> nn.Module:
    """The model ``spec`` names (zoo name, ``torchvision:NAME`` or ``MODULE:CALLABLE``), built with
    ``kwargs`` (for example ``num_classes=10``) and random weights."""
    from . import MODEL_NAMES, build_model

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model must be a non-empty string, got {spec!r}")
    if spec in MODEL_NAMES:
        return build_model(spec, **kwargs)
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: give a zoo name ({', '.join(MODEL_NAMES)}), "
                         "torchvision:NAME or MODULE:CALLABLE")
    module_name, _, attr = spec.partition(":")
    if module_name == "torchvision":
        import torchvision

        available = torchvision.models.list_models(module=torchvision.models)
        if attr not in available:
            raise ValueError(f"unknown torchvision model {attr!r}; classification models: {', '.join(available)}")
        # A module called at several sites (ResNet's shared self.relu) is split by the
        # conversion's canonicalisation: the model is returned as torchvision builds it.
        return torchvision.models.get_model(attr, weights=None, **kwargs)
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: expected MODULE:CALLABLE, e.g. mymodels:resnet20")
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:  # the working directory, as ``python -m`` would see it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r} ({exc}); put it on PYTHONPATH "
                         "or in the working directory") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's own code: whatever it raises is a problem with that model
        raise ValueError(f"model {spec!r}: calling {attr}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                         f"failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    return model


def extract_state_dict(blob: Any, source: str = "weights", model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The state_dict inside ``blob``: ``blob`` itself or ``blob[k]`` for ``k`` in
    :data:`WRAPPER_KEYS` (nested once more at most), ``module.``/``_orig_mod.`` prefixes stripped
    in any order and nesting. Given the ``model`` it is for, a state that fits it as it is keeps its
    keys (a model whose own submodule is called ``module``)."""
    state = blob
    for _ in range(3):
        if isinstance(state, Mapping) and state and all(torch.is_tensor(v) for v in state.values()):
            break
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state, Mapping) and isinstance(state.get(k), Mapping)),
                     None)
        if inner is None:
            break
        state = inner
    if not (isinstance(state, Mapping) and state and all(isinstance(k, str) for k in state)
            and all(torch.is_tensor(v) for v in state.values())):
        keys = sorted(map(str, blob))[:8] if isinstance(blob, Mapping) else type(blob).__name__
        raise ValueError(f"{source} holds no state_dict (top-level keys {keys}); expected a mapping of parameter "
                         f"names to tensors, possibly under {', '.join(map(repr, WRAPPER_KEYS))}")
    # A shallow copy keeps the per-module versions torch saves with a state (BatchNorm's says
    # whether it predates num_batches_tracked); torch's own prefix helper renames them with the
    # keys, so that load_state_dict judges the file as torch would.
    out = copy.copy(state) if isinstance(state, collections.OrderedDict) else collections.OrderedDict(state)
    if model is not None and state_dict_mismatch(model, out) is None:
        return out
    # torch.compile(DataParallel(m)) writes "_orig_mod.module.", DataParallel(torch.compile(m))
    # "module._orig_mod.": strip until neither is left.
    while True:
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in out)), None)
        if prefix is None:
            return out
        consume_prefix_in_state_dict_if_present(out, prefix)


def state_dict_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``None`` if ``state`` fits ``model`` exactly, else its missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if k in state and torch.is_tensor(v) and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or wrong):
        return None

    def show(items):
        return f"{items[:6]}{f' and {len(items) - 6} more' if len(items) > 6 else ''}"

    parts = [f"{label} {show(items)}" for label, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    return "; ".join(parts)


def load_user_model(spec: str, weights: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build the model ``spec`` names and load ``weights`` (a state_dict file) into it strictly.

    Args:
        spec: a zoo name, ``torchvision:NAME`` or ``MODULE:CALLABLE`` (see the module docstring).
        weights: path of a file holding the state_dict (plain or wrapped, see
            :func:`extract_state_dict`); ``None`` keeps the factory's initial weights.
        kwargs: passed to the factory (``num_classes=10``, ...).

    Returns the model in eval mode. Raises ``ValueError`` naming the model and the file when the
    model cannot be built or ``load_state_dict(strict=True)`` refuses the weights (listing
    missing/unexpected keys and shape mismatches, see :func:`load_state`), and the errors of
    :func:`~sj_parallel_conversion.fileio.load_tensor_file` for missing, corrupt or pickle-only files.
    """
    model = build_user_model(spec, **kwargs)
    if weights is not None:
        blob = load_tensor_file(weights, what="weights file")
        state = extract_state_dict(blob, f"weights file {os.fspath(weights)!r}", model)
        load_state(model, state, f"weights file {os.fspath(weights)!r}", f"model {spec!r}")
    return model.eval()
