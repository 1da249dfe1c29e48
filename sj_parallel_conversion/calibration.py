"""The calibration loops of parallel conversion, one function per paper stage.

``calibrate_da``       ClipReLU/QCFS -> calibrated DA-QCFS (Algorithm 1, Stage II)
``calibrate_da_variants``  the same from several starts, sharing one pass over the data
``to_daqcfs``          ClipReLU/QCFS -> DA-QCFS at T without calibration
``to_nodes``           DA-QCFS -> ParallelConversionNode (Algorithm 1, Stage III)

Each works on a graph prepared by :func:`sj_parallel_conversion.graph.prepare_graph` and swaps
the module behind every activation site. Stage 1 of training-free conversion (ReLU -> ClipReLU at
the per-channel historical maxima, paper 4.2) is the recipe's own ``insert_observers`` and
``calibrate`` stages, with :class:`~.observers.MaxObserver`.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import fx

from . import formulas
from .activation import DAQCFS, QCFS, ClipReLU
from .graph import activation_sites
from .observers import DACalibrator, MaxObserver, Reducer, SharedReference
from .patterns import module_pattern
from .sites import is_activation_module
from .progress import progress as progress_bar

__all__ = ["extract_input", "check_input", "CalibrationData", "iterate_inputs", "calibrate_da", "calibrate_da_variants", "convolution_sites", "mse_thresholds", "to_daqcfs", "to_nodes", "replace_sites"]


_INPUT_KEYS = ("input", "inputs", "image", "images", "img", "x", "data", "pixel_values")


def extract_input(batch: Any) -> torch.Tensor:
    """The input tensor of one calibration batch.

    Accepts a tensor, a ``(x, y, ...)`` tuple or list (its first element), or a dict with one of
    the keys ``input(s)``, ``image(s)``, ``img``, ``x``, ``data``, ``pixel_values``. Labels are
    never used: calibration matches the ANN, not the targets.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("a calibration batch is an empty list/tuple")
        return extract_input(batch[0])
    if isinstance(batch, dict):
        for key in _INPUT_KEYS:
            if key in batch:
                return extract_input(batch[key])
        raise ValueError(f"a calibration batch is a dict without an input key (one of {_INPUT_KEYS}); "
                         f"its keys are {sorted(map(str, batch))}")
    raise TypeError(f"a calibration batch must be a tensor, an (x, y) tuple or a dict, got {type(batch).__name__}")


def check_input(x: Any, where: str = "the first calibration batch") -> torch.Tensor:
    """Raise a clear error unless ``x`` is a floating-point tensor with a batch axis."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must hold one input tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where} holds a {x.dtype} tensor; convert the inputs to floating point "
                        "(e.g. images scaled to [0, 1] and normalised as for the ANN)")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{where} has shape {tuple(x.shape)}; expected [N, ...] with a batch axis")
    if x.device.type != "meta":
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            # Calibration turns activations into thresholds and shifts: one NaN or inf pixel
            # would end as a non-finite parameter far from here, or, where a candidate is
            # discarded, in a network chosen by corrupted scores.
            raise ValueError(f"{where} holds {bad} NaN or infinite value(s) of {x.numel()}; calibrate on "
                             "finite inputs")
    return x


class CalibrationData:
    """The calibration batches of a conversion, readable as often as the stages need.

    A re-iterable loader (a list, a ``DataLoader``) is read anew on every pass. A one-shot
    iterator (a generator) is read once and its input tensors are kept in memory, at most
    ``max_cache_bytes``; beyond that it is refused with a message, since a second pass would
    otherwise find it empty. ``num_batches`` caps every pass.
    """

    def __init__(self, loader: Iterable, num_batches: Optional[int] = None,
                 max_cache_bytes: int = 4 << 30) -> None:
        if loader is None:
            raise ValueError("calibration data is None")
        try:
            it = iter(loader)
        except TypeError:
            raise TypeError(f"calibration data must be iterable (a DataLoader, a list of batches or a generator), "
                            f"got {type(loader).__name__}") from None
        self.loader = loader
        self.num_batches = num_batches
        self.max_cache_bytes = max_cache_bytes
        self.one_shot = it is loader
        self._iter = it if self.one_shot else None
        self._cache: List[torch.Tensor] = []
        self._cache_bytes = 0
        self._exhausted = False
        self._pass_lengths: List[int] = []  # batches of each pass of a re-iterable loader read to its end
        self._first_read = False  # first() read a batch

    def _one_shot_next(self) -> Optional[torch.Tensor]:
        if self._exhausted or (self.num_batches is not None and len(self._cache) >= self.num_batches):
            self._exhausted = True
            return None
        try:
            batch = next(self._iter)
        except StopIteration:
            self._exhausted = True
            return None
        x = check_input(extract_input(batch), f"calibration batch {len(self._cache)}").detach().cpu()
        self._cache_bytes += x.numel() * x.element_size()
        if self._cache_bytes > self.max_cache_bytes:
            raise ValueError(
                f"the calibration data is a one-shot iterator ({type(self.loader).__name__}) holding more than "
                f"{self.max_cache_bytes / 2**30:.1f} GiB of inputs, which conversion would have to keep in memory "
                "to read it more than once; pass num_batches=... or a re-iterable loader (a list or a DataLoader)")
        self._cache.append(x)
        return x

    def first(self) -> torch.Tensor:
        """The first batch's input tensor, checked (reads one batch; nothing else is consumed)."""
        if self.one_shot:
            x = self._cache[0] if self._cache else self._one_shot_next()
        else:
            x = next((extract_input(b) for b in self.loader), None)
            self._first_read = x is not None
        if x is None:
            raise ValueError("the calibration data yielded no batch")
        return check_input(x)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.one_shot:
            i = 0
            while True:
                x = self._cache[i] if i < len(self._cache) else self._one_shot_next()
                if x is None:
                    return
                yield x
                i += 1
        else:
            # islice: a pass capped at num_batches fetches no batch beyond them.
            n = 0
            for i, batch in enumerate(itertools.islice(self.loader, self.num_batches)):
                n += 1
                yield check_input(extract_input(batch), f"calibration batch {i}")
            # A pass read to its end: every pass of a re-iterable loader yields as many batches.
            first = self._pass_lengths[0] if self._pass_lengths else (1 if self._first_read else 0)
            if n < first:
                raise ValueError(
                    f"the calibration loader ({type(self.loader).__name__}) yielded {first} batch(es) on an earlier "
                    f"pass and {n} on this one: it can be read only once (a DataLoader over a streaming dataset, "
                    "say), and conversion reads it more than once; pass a list of batches or a generator, which "
                    "is read once and kept")
            self._pass_lengths.append(n)

    def __len__(self) -> int:
        if self.one_shot:
            if not self._exhausted:
                raise TypeError("the length of a one-shot calibration iterator is known only after one pass")
            return len(self._cache)
        n = len(self.loader)  # type: ignore[arg-type]
        return n if self.num_batches is None else min(n, self.num_batches)

    def length_hint(self) -> Optional[int]:
        try:
            return len(self)
        except TypeError:
            return self.num_batches


def iterate_inputs(
    loader: Iterable, device: Union[str, torch.device], num_batches: Optional[int] = None,
    desc: str = "calibration", progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Input tensors on ``device`` from any iterable of batches (tensors, ``(x, y)`` tuples, dicts)."""
    data = loader if isinstance(loader, CalibrationData) else CalibrationData(loader, num_batches)
    seen = 0
    for x in progress_bar(data, desc, progress, total=data.length_hint()):
        yield x.to(device)
        seen += 1
    if seen == 0:
        raise ValueError("the calibration data yielded no batch")


def replace_sites(gm: fx.GraphModule, fn) -> fx.GraphModule:
    """Replace the module behind each activation site (observers included) by ``fn(target, module)``."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        # The calibration's observers stand where an activation was until they are replaced back.
        if mod is not None and (is_activation_module(mod) or isinstance(mod, (MaxObserver, DACalibrator, SharedReference))):
            parent, _, child = node.target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, child, fn(node.target, getattr(owner, child)))
    return gm


@torch.no_grad()
def calibrate_da(
    gm: fx.GraphModule, loader: Iterable, T: Union[int, Callable[[str], int]], device,
    num_batches: Optional[int] = None, alpha: float = 0.99, bias_correction: bool = True,
    progress: bool = True, reducer: Reducer = None, method: str = "ema", sites: Optional[Iterable[str]] = None,
    thresholds: Optional[Dict[str, torch.Tensor]] = None,
) -> fx.GraphModule:
    """Algorithm 1: calibrate a DA-QCFS at ``T`` levels against each QCFS/ClipReLU site.

    ``T`` is an int or a function of the site's name (per-layer time steps). ``sites`` names the
    sites to calibrate (default all); the others become uncalibrated DA-QCFS. ``thresholds``
    (from :func:`mse_thresholds`) replaces the DA-QCFS thresholds of the sites it names; the
    reference stream keeps the original activations.
    """
    return calibrate_da_variants(gm, loader, T, device, [thresholds], num_batches, alpha, bias_correction, progress,
                                 reducer, method, sites)[0]


@torch.no_grad()
def calibrate_da_variants(
    gm: fx.GraphModule, loader: Iterable, T: Union[int, Callable[[str], int]], device,
    variants: Sequence[Optional[Dict[str, torch.Tensor]]], num_batches: Optional[int] = None, alpha: float = 0.99,
    bias_correction: bool = True, progress: bool = True, reducer: Reducer = None, method: str = "ema",
    sites: Optional[Iterable[str]] = None,
) -> List[fx.GraphModule]:
    """:func:`calibrate_da` from several starts in one pass over the data, one network per entry
    of ``variants`` (``None``: the sites' own thresholds; else thresholds as ``thresholds`` of
    :func:`calibrate_da`). The ANN's reference stream runs once for all of them
    (:class:`~.observers.SharedReference`; each batch is sent ``len(variants) + 1`` times); each
    result equals :func:`calibrate_da` with its entry (bit for bit on the CPU, where a layer's
    result for one image does not depend on the batch). The first is ``gm`` itself, the others
    copies of it.
    """
    if not variants:
        raise ValueError("calibrate_da_variants needs at least one variant")
    t_of = T if callable(T) else (lambda _: T)
    chosen = None if sites is None else set(sites)
    copies = [copy.deepcopy(gm) for _ in variants[1:]]
    streams: Dict[str, List[DACalibrator]] = {}

    def wrap(name, m):
        if isinstance(m, (QCFS, ClipReLU)):
            streams[name] = [DACalibrator(m, _start(m, t_of(name), (v or {}).get(name)), alpha=alpha,
                                          bias_correction=bias_correction, reducer=reducer, method=method,
                                          update=chosen is None or name in chosen) for v in variants]
            return streams[name][0] if len(variants) == 1 else SharedReference(streams[name])
        raise TypeError(f"activation site {name!r} holds {type(m).__name__}; expected QCFS or ClipReLU")

    replace_sites(gm, wrap)
    gm.eval()
    try:
        for x in iterate_inputs(loader, device, num_batches, f"DA-QCFS calibration", progress):
            gm(torch.cat([x] * (len(variants) + 1), dim=0))
    finally:
        replace_sites(gm, lambda name, m: streams[name][0].da if name in streams else m)
    for i, other in enumerate(copies, start=1):
        replace_sites(other, lambda name, m: streams[name][i].da)
    return [gm] + copies


def convolution_sites(gm: fx.GraphModule) -> List[str]:
    """Activation sites whose input comes from a convolution (through sums, pads, norms and other
    single-input steps along the first argument) rather than from a fully connected layer."""
    modules = dict(gm.named_modules())
    found = []
    for site in activation_sites(gm):
        node = site.args[0] if site.args else None
        while isinstance(node, fx.Node) and node.op != "placeholder":
            module = modules.get(node.target) if node.op == "call_module" else None
            pattern = module_pattern(module) if module is not None else None
            if pattern is not None and pattern.role == "synaptic":  # a convolution or a linear layer
                if not isinstance(module, nn.Linear):
                    found.append(site.target)
                break
            node = node.args[0] if node.args else None
    return found


@torch.no_grad()
def mse_thresholds(
    gm: fx.GraphModule, loader: Iterable, T: Union[int, Callable[[str], int]], device,
    max_images: int = 256, samples: int = 16384, grid: int = 64, reducer: Reducer = None,
) -> Dict[str, torch.Tensor]:
    """Per-channel thresholds for the ``T``-level DA-QCFS of every ClipReLU site, by site name.

    The recorded maximum is the right clip for a ReLU but a poor step for ``T`` levels: at small
    ``T`` most activations round to 0. Each channel's threshold becomes the fraction of its
    maximum (from ``grid`` candidates in (0, 1]) whose uncalibrated ``T``-level DA-QCFS output is
    closest, in mean squared error, to the site's own output on the first ``max_images``
    calibration images (at most ``samples`` values per channel, drawn with a fixed seed). This is
    how post-training quantisation picks step sizes; the ANN's own inputs reach every site, so
    the sites are independent. QCFS sites keep their trained threshold (they are not in the
    result). ``gm`` is not changed: :func:`calibrate_da` and :func:`to_daqcfs` take the result.
    """
    t_of = T if callable(T) else (lambda _: T)
    sites = {n.target: gm.get_submodule(n.target) for n in activation_sites(gm)}
    sites = {name: m for name, m in sites.items() if isinstance(m, ClipReLU)}
    inputs: dict = {name: [] for name in sites}
    gen = torch.Generator().manual_seed(0)

    def keep(name):
        def hook(module, args, out):
            x = args[0].detach()
            cd = module.channel_dim % x.dim()
            # The values of channel-first flattening at random positions, gathered without
            # building that copy of the whole activation.
            rest = [n for d, n in enumerate(x.shape) if d != cd]
            take = torch.randperm(x.numel() // max(1, x.shape[cd]), generator=gen)[:samples].to(x.device)
            index: List[Any] = []
            for size in reversed(rest):  # row-major unravelling (torch.unravel_index imports sympy)
                index.insert(0, take % size)
                take = take // size
            index.insert(cd, slice(None))
            picked = x[tuple(index)]  # [samples, C], unless the channel axis is the first
            inputs[name].append((picked if cd == 0 else picked.t()).float().cpu())
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in sites.items()]
    seen = 0
    try:
        for x in iterate_inputs(loader, device, None, "choosing thresholds", False):
            gm(x[:max_images - seen])
            seen += min(x.shape[0], max_images - seen)
            if seen >= max_images:
                break
    finally:
        for h in hooks:
            h.remove()
    fractions = torch.arange(1, grid + 1, dtype=torch.float32) / grid
    chosen: Dict[str, torch.Tensor] = {}
    for name, m in sites.items():
        x = torch.cat(inputs[name], dim=1)
        x = x[:, torch.randperm(x.shape[1], generator=gen)[:samples]]
        theta_max = m.theta.detach().float().cpu().expand(x.shape[0]).clone()
        target = torch.minimum(x.clamp(min=0), theta_max[:, None])
        T_site = t_of(name)
        errors = torch.empty(grid, x.shape[0], dtype=torch.float64)
        for i, f in enumerate(fractions):
            theta = (theta_max * f)[:, None]
            diff = formulas.da_qcfs(x, theta, T_site, 0.0, 0.0, 0.5 * theta).sub_(target)
            # Squared in float64 a few channels at a time: casting the whole block at once cost
            # five times the search itself (same sums, same order, per channel).
            errors[i] = torch.cat([rows.double().pow_(2).sum(dim=1) for rows in diff.split(8)])
        if reducer is not None:
            errors = reducer(errors, "sum")
        best = theta_max * fractions[errors.argmin(dim=0)]
        chosen[name] = best.clamp(min=1e-4).to(m.theta.device, m.theta.dtype)
    return chosen


def _start(m: nn.Module, T: int, theta: Optional[torch.Tensor]) -> DAQCFS:
    """The uncalibrated DA-QCFS of a QCFS/ClipReLU site, with ``theta`` in place of its own if given."""
    da = m.to_daqcfs(T)
    if theta is not None:
        da.theta = theta.detach().clone().to(da.theta.device, da.theta.dtype)
    return da


def to_daqcfs(gm: fx.GraphModule, T: Union[int, Callable[[str], int]],
              thresholds: Optional[Dict[str, torch.Tensor]] = None) -> fx.GraphModule:
    """Uncalibrated DA-QCFS (psi_da = phi_da = 0) at every QCFS/ClipReLU site (``thresholds``: as
    in :func:`calibrate_da`)."""
    t_of = T if callable(T) else (lambda _: T)
    return replace_sites(gm, lambda name, m: _start(m, t_of(name), (thresholds or {}).get(name))
                         if isinstance(m, (QCFS, ClipReLU)) else m)


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

