"""Evaluating converted models: spike-level runs and the count-domain shortcut.

Every layer between two parallel neurons is linear (convolution, pooling, BN folded, residual
sums, padding, reshaping) or a max pool of sorted trains, so it commutes with the time mean; each
neuron needs only the mean of its input. :func:`count_inference` therefore runs the converted
network once on ``[N, ...]`` input, with every neuron returning its rate ``spike_value * k / T``,
and gets what the spike-level run's time mean would give at about the cost of one ANN forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from .neuron import ParallelConversionNode

__all__ = ["count_inference", "count_domain", "spike_inference", "predictor", "repeat_input"]


def _nodes(model: nn.Module):
    nodes = [m for m in model.modules() if isinstance(m, ParallelConversionNode)]
    if not nodes:
        raise ValueError("the model contains no ParallelConversionNode; convert it with ParallelConverter first")
    return nodes


def _step_modes(model: nn.Module):
    return {m: m.step_mode for m in model.modules() if hasattr(m, "step_mode")}


@contextlib.contextmanager
def count_domain(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model takes ``[N, ...]`` input and returns time-mean outputs."""
    nodes = _nodes(model)
    saved = _step_modes(model)
    functional.set_step_mode(model, "s")
    for n in nodes:
        n._count_domain = True
    try:
        yield model
    finally:
        for n in nodes:
            n._count_domain = False
        for m, mode in saved.items():
            m.step_mode = mode


def count_inference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Time-mean output of a converted model for direct-encoded input ``x`` of shape ``[N, ...]``.

    Equals ``spike_inference(model, x, T).mean(0)`` up to floating-point summation order: the
    spike-level run sums ``T`` per-step currents where this one multiplies a rate, so values agree
    to about ``1e-5`` relative in float32, and a count can differ by one where a neuron's input
    lies within rounding distance of a firing boundary (rare; predictions agree).
    """
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"count_inference expects input of shape [N, ...], got {getattr(x, 'shape', type(x))}")
    with torch.no_grad(), count_domain(model):
        return model(x)


def repeat_input(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: the static input ``[N, ...]`` repeated into ``[T, N, ...]``."""
    return x.unsqueeze(0).expand((T,) + tuple(x.shape)).contiguous()


def spike_inference(model: nn.Module, x: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
    """Spike-level run of a converted model on static input ``x`` of shape ``[N, ...]``.

    Returns the output sequence ``[T_out, N, ...]``. With ``T=None`` (parallel networks only) the
    image is fed once, as one input step (``T_in = 1``): every parallel neuron reads only the time
    mean of its input, and the mean of ``T`` identical copies can round differently from the
    image itself. With an int ``T`` the image is repeated ``T`` times (direct encoding), which
    SpikingJelly's IF networks need.
    """
    if T is None:
        _nodes(model)
        steps = 1
    else:
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be None or an integer >= 1, got {T!r}")
        steps = T
    functional.reset_net(model)
    with torch.no_grad():
        out = model(repeat_input(x, steps))
    functional.reset_net(model)
    return out


def predictor(model: nn.Module, T: int, count_domain: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> time-mean output`` of a converted model on static input ``x``.

    ``count_domain=False``: a spike-level run (:func:`spike_inference`): parallel networks get
    the image once (each neuron emits its own ``T`` steps); any other multi-step SNN whose state
    ``functional.reset_net`` clears, SpikingJelly's IF-neuron conversions included, gets it
    repeated ``T`` times. ``count_domain=True``: :func:`count_inference` (parallel neurons only;
    each neuron uses its own ``T``).
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    if count_domain:
        return lambda x: count_inference(model, x)
    if any(isinstance(m, ParallelConversionNode) for m in model.modules()):
        return lambda x: spike_inference(model, x).mean(0)
    return lambda x: spike_inference(model, x, T).mean(0)
