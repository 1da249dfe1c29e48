"""Model zoo for conversion experiments, and checkpoints that rebuild themselves.

* :func:`build_model` -- ``'cnn'``, ``'digits_cnn'``, ``'vgg16'``, ``'resnet18'``,
  ``'resnet20'``/``32``/``44``/``56`` with ReLU or QCFS activations (:data:`MODEL_NAMES`).
* :func:`torchvision_resnet` -- torchvision ResNet-18/34/50/101 with weights from a local file.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- ``state_dict`` + the metadata that
  :func:`build_model` needs.
* :func:`load_user_model` -- any model (zoo name, ``torchvision:NAME``, ``MODULE:CALLABLE``) with
  weights from a plain or wrapped state_dict file.

Every activation site is a distinct module made by :func:`make_act`, so converters that replace
activation modules one by one see every site.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn

from ...activation import QCFS
from ...fileio import load_state, load_tensor_file, save_tensors
from .cifar import BasicBlock, CifarCNN, CifarResNet, DigitsCNN, OptionABlock, ResNet18, VGG16
from .tv import torchvision_resnet
from .user import build_user_model, extract_state_dict, load_user_model, state_dict_mismatch

__all__ = [
    "MODEL_NAMES", "ACTIVATIONS", "build_model", "make_act", "torchvision_resnet",
    "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "state_dict_mismatch",
    "load_user_model", "build_user_model", "extract_state_dict",
    "CifarCNN", "DigitsCNN", "VGG16", "ResNet18", "CifarResNet", "BasicBlock", "OptionABlock",
]

MODEL_NAMES = ("cnn", "digits_cnn", "vgg16", "resnet18", "resnet20", "resnet32", "resnet44", "resnet56")
ACTIVATIONS = ("relu", "qcfs")
CHECKPOINT_FORMAT = "sj_parallel_conversion.ann.v1"


def make_act(act: str = "relu", L: int = 8, theta: float = 8.0) -> Callable[[], nn.Module]:
    """An activation factory: every call returns a NEW module (``nn.ReLU()`` or ``QCFS(L, theta)``)."""
    if act == "relu":
        return lambda: nn.ReLU()
    if act == "qcfs":
        return lambda: QCFS(L=L, theta=theta)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def build_model(name: str, num_classes: int = 10, act: str = "relu", L: int = 8, theta: float = 8.0,
                in_channels: int = 3, **kw) -> nn.Module:
    """Build a zoo model. ``act='qcfs'`` uses ``QCFS(L, theta)`` at every site (learnable theta).

    Extra keywords: ``cnn``: ``widths``; ``digits_cnn``: ``width``; ``vgg16``: ``pool='avg'|'max'``,
    ``dropout``, ``hidden``; ``resnet20..56``: ``shortcut='A'|'B'``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODEL_NAMES)}")
    f = make_act(act, L, theta)
    if name == "cnn":
        return CifarCNN(f, num_classes, in_channels, **kw)
    if name == "digits_cnn":
        return DigitsCNN(f, num_classes, in_channels, **kw)
    if name == "vgg16":
        return VGG16(f, num_classes, in_channels, **kw)
    if name == "resnet18":
        return ResNet18(f, num_classes, in_channels, **kw)
    return CifarResNet(f, int(name[len("resnet"):]), num_classes, in_channels, **kw)


def save_checkpoint(path, model: nn.Module, *, name: str, act: str, L: int, num_classes: int,
                    in_channels: int = 3, extra: Optional[Dict[str, Any]] = None,
                    kwargs: Optional[Dict[str, Any]] = None) -> None:
    """Save ``model.state_dict()`` with the metadata :func:`load_checkpoint` rebuilds it from.

    ``kwargs`` are extra :func:`build_model` keywords (e.g. ``{"shortcut": "B"}``); ``extra``
    entries (accuracy, command, ``input_size``, optimizer state, ...) are stored at the top level.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(MODEL_NAMES)}")
    blob: Dict[str, Any] = dict(extra or {})
    blob.update(format=CHECKPOINT_FORMAT, name=name, act=act, L=int(L), num_classes=int(num_classes),
                in_channels=int(in_channels), kwargs=dict(kwargs or {}),
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})
    d = os.path.dirname(os.fspath(path))
    if d:
        os.makedirs(d, exist_ok=True)
    save_tensors(blob, path)


def load_checkpoint(path, map_location="cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model saved by :func:`save_checkpoint`; returns ``(model in eval mode, meta)``
    where ``meta`` is everything but the ``state_dict``."""
    blob = load_tensor_file(path, what="checkpoint", map_location=map_location)
    if not isinstance(blob, dict) or "state_dict" not in blob or "name" not in blob:
        raise ValueError(f"{os.fspath(path)!r} is not a model checkpoint (no 'name' / 'state_dict')")
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    name = meta["name"]
    if name not in MODEL_NAMES:
        raise ValueError(f"checkpoint {os.fspath(path)!r} names unknown model {name!r}; "
                         f"available models: {', '.join(MODEL_NAMES)}")
    model = build_model(name, num_classes=meta.get("num_classes", 10), act=meta.get("act", "relu"),
                        L=meta.get("L", 8), in_channels=meta.get("in_channels", 3), **meta.get("kwargs", {}))
    state = blob["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {os.fspath(path)!r}: 'state_dict' is a {type(state).__name__}, not a mapping")
    desc = f"{name} (act={meta.get('act')}, num_classes={meta.get('num_classes')}, in_channels={meta.get('in_channels')})"
    load_state(model, state, f"checkpoint {os.fspath(path)!r}", f"model {desc}")
    return model.eval(), meta
