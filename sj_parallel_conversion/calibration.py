"""The calibration loops of parallel conversion, one function per paper stage.

``record_thresholds``  ReLU -> ClipReLU (per-channel historical maxima, paper 4.2 stage 1)
``calibrate_da``       ClipReLU/QCFS -> calibrated DA-QCFS (Algorithm 1, Stage II)
``to_daqcfs``          ClipReLU/QCFS -> DA-QCFS at T without calibration
``to_nodes``           DA-QCFS -> ParallelConversionNode (Algorithm 1, Stage III)

Each works on a graph prepared by :func:`sj_parallel_conversion.graph.prepare_graph` and swaps
the module behind every activation site.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch import fx
from tqdm.auto import tqdm

from .activation import DAQCFS, QCFS, ClipReLU
from .graph import AnalogReLU
from .observers import DACalibrator, MaxObserver, Reducer

__all__ = ["iterate_inputs", "record_thresholds", "calibrate_da", "to_daqcfs", "to_nodes", "replace_sites"]


def iterate_inputs(
    loader: Iterable, device: Union[str, torch.device], num_batches: Optional[int] = None,
    desc: str = "calibration", progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Input tensors from any iterable of batches (tensors, ``(x, y)`` tuples, dicts)."""
    from spikingjelly.activation_based.ann2snn.recipes.rate_coding import _extract_batch_input

    total = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    seen = 0
    for batch in tqdm(loader, total=total, desc=desc, disable=not progress, leave=False):
        if num_batches is not None and seen >= num_batches:
            break
        x = _extract_batch_input(batch)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batches must hold one input tensor, got {type(x).__name__}")
        yield x.to(device)
        seen += 1
    if seen == 0:
        raise ValueError("the calibration loader yielded no batch")


def replace_sites(gm: fx.GraphModule, fn) -> fx.GraphModule:
    """Replace the module behind each activation site (observers included) by ``fn(target, module)``."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (nn.ReLU, ClipReLU, QCFS, DAQCFS, MaxObserver, DACalibrator)) \
                and not isinstance(mod, AnalogReLU):
            parent, _, child = node.target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, child, fn(node.target, getattr(owner, child)))
    return gm


@torch.no_grad()
def record_thresholds(
    gm: fx.GraphModule, loader: Iterable, device, num_batches: Optional[int] = None,
    progress: bool = True, reducer: Reducer = None, channel_dim: int = 1,
) -> fx.GraphModule:
    """Stage 1 of training-free conversion: ReLU/ClipReLU sites become ClipReLU(per-channel max)."""
    def wrap(_, m):
        if isinstance(m, (nn.ReLU, ClipReLU)):
            return MaxObserver(m, channel_dim=channel_dim, reducer=reducer)
        return m

    replace_sites(gm, wrap)
    gm.eval()
    for x in iterate_inputs(loader, device, num_batches, "recording thresholds", progress):
        gm(x)
    return replace_sites(gm, lambda _, m: m.to_clip_relu() if isinstance(m, MaxObserver) else m)


@torch.no_grad()
def calibrate_da(
    gm: fx.GraphModule, loader: Iterable, T: Union[int, Callable[[str], int]], device,
    num_batches: Optional[int] = None, alpha: float = 0.99, bias_correction: bool = True,
    progress: bool = True, reducer: Reducer = None, method: str = "ema",
) -> fx.GraphModule:
    """Algorithm 1: calibrate a DA-QCFS at ``T`` levels against each QCFS/ClipReLU site.

    ``T`` is an int or a function of the site's name (per-layer time steps).
    """
    t_of = T if callable(T) else (lambda _: T)

    def wrap(name, m):
        if isinstance(m, (QCFS, ClipReLU)):
            return DACalibrator(m, m.to_daqcfs(t_of(name)), alpha=alpha, bias_correction=bias_correction,
                                reducer=reducer, method=method)
        raise TypeError(f"activation site {name!r} holds {type(m).__name__}; expected QCFS or ClipReLU")

    replace_sites(gm, wrap)
    gm.eval()
    try:
        for x in iterate_inputs(loader, device, num_batches, f"DA-QCFS calibration", progress):
            gm(torch.cat([x, x], dim=0))
    finally:
        replace_sites(gm, lambda _, m: m.da if isinstance(m, DACalibrator) else m)
    return gm


def to_daqcfs(gm: fx.GraphModule, T: Union[int, Callable[[str], int]]) -> fx.GraphModule:
    """Uncalibrated DA-QCFS (psi_da = phi_da = 0) at every QCFS/ClipReLU site."""
    t_of = T if callable(T) else (lambda _: T)
    return replace_sites(gm, lambda name, m: m.to_daqcfs(t_of(name)) if isinstance(m, (QCFS, ClipReLU)) else m)


def to_nodes(gm: fx.GraphModule, **node_kwargs) -> fx.GraphModule:
    """Every DA-QCFS site becomes its parallel conversion neuron."""
    def swap(name, m):
        if not isinstance(m, DAQCFS):
            raise TypeError(f"activation site {name!r} holds {type(m).__name__}; expected DAQCFS")
        try:
            return m.to_node(**node_kwargs)
        except ValueError as exc:
            raise ValueError(f"activation site {name!r}: {exc}") from exc

    return replace_sites(gm, swap)


def extract_input(batch) -> torch.Tensor:
    """The input tensor of one batch: the batch itself, the first item of a ``(x, y, ...)``
    tuple/list, or the ``"input"``/``"image"``/``"x"`` entry of a dict. Raises :class:`TypeError`
    naming the batch's type otherwise."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "image", "x"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError(f"cannot find the input tensor in a batch of type {type(batch).__name__}; pass tensors, "
                    "(x, y) tuples or dicts with an 'input', 'image' or 'x' tensor")
