"""Learned and distilled calibration: fit every neuron's per-channel parameters (and, for
``distill``, the network's weights) to the ANN's outputs.

Algorithm 1 sets ``psi_da`` and ``phi_da`` layer by layer from mean errors. Here the same three
per-channel quantities of every site, ``theta_pre`` (firing threshold), ``theta_post`` (spike
value) and ``psi_da`` (input shift), are learned jointly, by gradient descent on a label-free loss
between the converted network's logits and the ANN's on calibration images (the idea of
post-training quantisation methods that learn step sizes and offsets from unlabeled data);
:class:`DistillCalibration` moves the weights and biases too, with a smaller rate.

The network being fitted computes exactly the count domain of the final spiking network: each
site evaluates the DA-QCFS closed form ``theta_post / T * clip(floor(((x + psi_da) * T +
theta_pre / 2) / theta_pre), 0, T)``, whose floor passes gradients straight through. After
fitting, each site becomes an ordinary :class:`~sj_parallel_conversion.DAQCFS` and then the same
:class:`~sj_parallel_conversion.ParallelConversionNode` as any other conversion: no extra modules.

Thresholds are parameterised as ``theta0 * exp(a)`` with ``a`` clamped to ``[-LOG_RANGE,
LOG_RANGE]``, so they stay positive and within a factor ``exp(LOG_RANGE)`` of where they started.
The images are split into a fitting part and a held-out part; the held-out loss decides which
parameters to keep, when to cut the step size and when to stop, and a fit that agrees with the
ANN clearly less often than its start (:func:`fall_back_margin`) on the held-out images and
blends of them (``fall_back_blends``) returns the start.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from . import formulas
from .activation import DAQCFS, QCFS, ClipReLU
from .blocks import block_boundaries, split_blocks
from .augment import random_crop_flip, with_blends
from .observers import Reducer
from .progress import progress as progress_bar

__all__ = ["LearnedCalibration", "DistillCalibration", "BlockCacheTooLarge", "check_block_cache", "LearnedSite", "daqcfs_fit", "take_images", "split_images", "learn_calibration", "held_out_score", "fall_back_margin",
           "distillation_kl", "LOSSES"]

LOSSES = ("kl", "mse", "kl+sites")
STARTS = ("mse", "ema", "none")
SCOPES = ("network", "blocks")
LOG_RANGE = math.log(100.0)
logger = logging.getLogger("sj_parallel_conversion")


@dataclass
class LearnedCalibration:
    """Options of ``method="learned"`` (and of the learned candidate of ``method="auto"``).

    Args:
        steps: at most this many Adam steps (one minibatch each).
        lr: peak Adam learning rate of the log-thresholds and of ``psi_da / theta0``.
        weight_lr: peak Adam learning rate of the network's weights and biases; 0 (the default
            here) fits the neurons' parameters only. :class:`DistillCalibration` sets it.
        warmup: steps over which every rate rises linearly to its peak (``scope="network"``).
        loss: ``"kl"`` (KL divergence from the ANN's softmax to the SNN's, at ``temperature``;
            the default), ``"mse"`` (squared error of the logits) or ``"kl+sites"`` (KL plus the
            normalised squared error of every site's output against the ANN's activation there,
            weighted by ``site_weight``, which guides deep networks layer by layer as block-wise
            reconstruction does; ``scope="network"`` only). With ``scope="blocks"`` it is the loss
            of the last block (the logits); the other blocks are fitted by squared error.
        site_weight: weight of the per-site terms of ``"kl+sites"``.
        temperature: both softmaxes of the KL loss divide the logits by it, and the loss is
            multiplied by its square (:func:`distillation_kl`). Softened targets carry the ANN's
            whole ranking of the classes, so every image informs the fit, not only those whose
            top class is in doubt; 1 is the plain KL. The held-out score that steers the fit is
            always the plain KL.
        start: where the fit starts: ``"mse"`` (thresholds chosen for ``T`` levels by squared
            error, then Algorithm 1; the recipe's ``method="mse"``), ``"ema"`` (Algorithm 1) or
            ``"none"`` (the uncalibrated DA-QCFS).
        batch_size: images per step (calibration batches are cut into chunks of at most this).
        holdout: fraction of the calibration images kept out of fitting, for early stopping
            (spread evenly over the images).
        eval_every: steps between two evaluations of the held-out loss (of the block, for
            ``scope="blocks"``, where the best evaluation's parameters are kept).
        patience: ``scope="network"``: evaluations without improvement that make a plateau. At a plateau the fit returns
            to the best parameters so far and multiplies the learning rate by ``decay``; the
            plateau after ``cuts`` such cuts ends the fit.
        decay: factor of each cut of the learning rate (in (0, 1)).
        cuts: cuts of the learning rate before a plateau ends the fit (0: the first plateau does).
        max_images: use at most this many calibration images (per process).
        seed: seed of the minibatch order and of the views; the same seed gives the same parameters.
        views: for image inputs (``[N, C, H, W]``, H and W at least 8): this many extra views of
            every fitting image, each randomly cropped (zero padding of H/8) and flipped, made once
            with the ANN's outputs for them, so that the fit sees more than the images themselves
            (labels are never needed). Other inputs get no views (the history says so).
        scope: ``"network"`` fits every parameter at once to the ANN's logits; ``"blocks"`` fits
            the network block by block (:mod:`~sj_parallel_conversion.blocks`), each block's output
            to the ANN's output of the same block by squared error (the last block's logits by
            KL), and ``steps`` is then per block, with a cosine-decaying rate and the held-out
            error of the block choosing the step kept. Reconstructing a block at a time needs
            only that block's forward and backward per step and cannot overfit the few
            calibration images the way a whole-network fit does (BRECQ, Li et al., 2021).
        mix: ``scope="blocks"``: probability that an element of a block's input comes from the
            ANN instead of the converted blocks before it, drawn anew at every step (QDrop, Wei et
            al., 2022); 0 feeds the converted network's own activations only.
        cache_gib: ``scope="blocks"``: the most memory (GiB) the fit may keep for block inputs and
            targets, on the calibration device; a fit that would need more is refused before it
            starts (``auto`` then skips it and says why).
        fall_back_blends: the fit's fall-back (:func:`fall_back_margin`) compares the fit with
            its start on the held-out images and on this many blends of each with other held-out
            images (:func:`~sj_parallel_conversion.augment.blends`), against the ANN's outputs
            for them: on held-out *training* images the ANN is confident and a start can look as
            good as a fit that agrees with it clearly more often on new images; on blends the
            difference shows. 0: the held-out images alone.
    """

    steps: int = 600
    lr: float = 1e-3
    weight_lr: float = 0.0
    warmup: int = 50
    loss: str = "kl"
    site_weight: float = 1.0
    temperature: float = 1.0
    start: str = "mse"
    batch_size: int = 64
    holdout: float = 0.2
    eval_every: int = 25
    patience: int = 2
    decay: float = 0.3
    cuts: int = 3
    max_images: Optional[int] = 1024
    seed: int = 0
    views: int = 3
    scope: str = "network"
    mix: float = 0.5
    cache_gib: float = 4.0
    fall_back_blends: int = 3

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        name = type(self).__name__
        for field in ("steps", "batch_size", "eval_every", "patience"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}.{field} must be an integer >= 1, got {v!r}")
        for field in ("cuts", "warmup", "views", "fall_back_blends"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}.{field} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.decay, (int, float)) and not isinstance(self.decay, bool) and 0 < self.decay < 1):
            raise ValueError(f"{name}.decay must be a number in (0, 1), got {self.decay!r}")
        if self.max_images is not None and (isinstance(self.max_images, bool) or not isinstance(self.max_images, int)
                                            or self.max_images < 2):
            raise ValueError(f"{name}.max_images must be None or an integer >= 2, got {self.max_images!r}")
        for field, positive in (("lr", True), ("weight_lr", False), ("site_weight", False), ("temperature", True),
                                ("cache_gib", True)):
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (v > 0 if positive else v >= 0)):
                raise ValueError(f"{name}.{field} must be a {'positive' if positive else 'non-negative'} number, "
                                 f"got {v!r}")
        if not (isinstance(self.holdout, (int, float)) and 0 < self.holdout < 1):
            raise ValueError(f"{name}.holdout must be a fraction in (0, 1), got {self.holdout!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"{name}.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"{name}.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.loss == "kl+sites" and self.scope == "blocks":
            raise ValueError(f"{name}.loss='kl+sites' needs scope='network': block by block, every block is "
                             "already fitted to the ANN's activations at its end")
        if not (isinstance(self.mix, (int, float)) and not isinstance(self.mix, bool) and 0 <= self.mix < 1):
            raise ValueError(f"{name}.mix must be a number in [0, 1), got {self.mix!r}")
        if self.start not in STARTS:
            raise ValueError(f"{name}.start must be one of {STARTS}, got {self.start!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{name}.seed must be an int, got {self.seed!r}")


@dataclass
class DistillCalibration(LearnedCalibration):
    """Options of ``method="distill"``: :class:`LearnedCalibration` that also learns the network's
    weights and biases (``weight_lr > 0``), block by block (``scope="blocks"``, ``steps`` per
    block); the fields and their meaning are the same."""

    weight_lr: float = 3e-4
    scope: str = "blocks"
    steps: int = 300
    batch_size: int = 32


def _channel_sum(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    cd = channel_dim % t.dim()
    return t.sum(dim=[d for d in range(t.dim()) if d != cd])


class _DAQCFSFit(torch.autograd.Function):
    """DA-QCFS with a straight-through floor, with its per-channel gradients written out.

    The forward is :func:`~sj_parallel_conversion.formulas.da_qcfs` with ``phi = post - pre``;
    the backward passes gradient 1 through the floor wherever the count is not clipped
    (``0 <= floor(u) <= T``, both ends included, as LSQ does for its rounding) and 0 elsewhere, with
    the per-channel sums written out. It keeps only the input for backward instead of a dozen
    intermediates, which makes fitting a few times faster and lighter on memory.
    """

    @staticmethod
    def forward(ctx, x, pre, post, psi, T: int, shift: float, channel_dim: int):
        nd = x.dim()
        pre_v, post_v, psi_v = (formulas.channel_view(p, nd, channel_dim) for p in (pre, post, psi))
        # Gradients are written out in backward, so the forward is the plain count (no
        # straight-through bookkeeping), the very expression the neuron evaluates.
        k = formulas.spike_count(x, T, pre_v, shift * pre_v, psi_v)
        ctx.save_for_backward(x, pre, post, psi)
        ctx.T, ctx.shift, ctx.channel_dim = T, shift, channel_dim
        return (pre_v + (post_v - pre_v)) / T * k

    @staticmethod
    def backward(ctx, grad):
        x, pre, post, psi = ctx.saved_tensors
        T, cd, nd = ctx.T, ctx.channel_dim, x.dim()
        pre_v, post_v, psi_v = (formulas.channel_view(p, nd, cd) for p in (pre, post, psi))
        shifted = x + psi_v
        floor_u = torch.floor((shifted * T + ctx.shift * pre_v) / pre_v)
        passing = grad * ((floor_u >= 0) & (floor_u <= T)).to(grad.dtype)
        step = (pre + (post - pre)) / T             # d out / d k, per channel
        slope = step * T / pre                      # d out / d x where the count is not clipped
        grad_x = passing * formulas.channel_view(slope, nd, cd) if ctx.needs_input_grad[0] else None
        grad_pre = -(slope / pre) * _channel_sum(passing * shifted, cd)
        grad_post = _channel_sum(grad * floor_u.clamp_(0, T), cd) / T
        grad_psi = slope * _channel_sum(passing, cd)
        return grad_x, grad_pre, grad_post, grad_psi, None, None, None


def daqcfs_fit(x: torch.Tensor, theta_pre: torch.Tensor, theta_post: torch.Tensor, psi_da: torch.Tensor,
               T: int, shift: float = 0.5, channel_dim: int = 1) -> torch.Tensor:
    """``theta_post/T * clip(floor(((x + psi_da)*T + shift*theta_pre)/theta_pre), 0, T)`` with a
    straight-through floor; ``theta_pre``, ``theta_post``, ``psi_da`` are 1-D per-channel tensors."""
    return _DAQCFSFit.apply(x, theta_pre, theta_post, psi_da, T, float(shift), channel_dim)


class LearnedSite(nn.Module):
    """One activation site during learned calibration (DA-QCFS with learnable per-channel parameters).

    Built from the site's ClipReLU (recorded maxima), QCFS (trained threshold) or DA-QCFS (an
    Algorithm 1 result): the fit starts exactly where the source is, i.e. at the uncalibrated
    DA-QCFS (``theta_pre = theta_post = theta0``, ``psi_da = 0``) for the first two and at the
    calibrated values for a DA-QCFS. Per-channel parameters are created on the first forward, from
    the input's channel count.
    """

    def __init__(self, source: nn.Module, T: int) -> None:
        super().__init__()
        if not isinstance(source, (QCFS, ClipReLU, DAQCFS)):
            raise TypeError(f"learned calibration starts from QCFS, ClipReLU or DAQCFS, got {type(source).__name__}")
        if isinstance(source, DAQCFS) and source.T != T:
            raise ValueError(f"learned calibration at T={T} cannot start from a DA-QCFS at T={source.T}")
        self.T = T
        self.channel_dim = source.channel_dim
        self.shift = source.shift if isinstance(source, (QCFS, DAQCFS)) else 0.5
        self.register_buffer("theta0", source.theta.detach().clone().to(torch.float32))
        start = (source.psi_da, source.phi_da) if isinstance(source, DAQCFS) else None
        self._start = None if start is None else tuple(t.detach().clone().to(torch.float32) for t in start)
        self.log_pre = nn.Parameter(torch.zeros(0))
        self.log_post = nn.Parameter(torch.zeros(0))
        self.psi_da_rel = nn.Parameter(torch.zeros(0))  # psi_da / theta0

    def _materialise(self, x: torch.Tensor) -> None:
        cd = self.channel_dim if self.channel_dim >= 0 else self.channel_dim + x.dim()
        c = x.shape[cd] if x.dim() > 1 else 1
        if self.theta0.numel() not in (1, c):
            raise ValueError(f"site has {self.theta0.numel()} thresholds but its input has {c} channels")
        dev = x.device
        self.theta0 = self.theta0.to(dev).expand(c).clone() if self.theta0.numel() == 1 else self.theta0.to(dev)
        for name in ("log_pre", "log_post", "psi_da_rel"):
            setattr(self, name, nn.Parameter(torch.zeros(c, device=dev)))
        if self._start is not None:
            psi_da, phi_da = (t.to(dev).expand(c) for t in self._start)
            with torch.no_grad():
                # theta_post = theta0 * exp(log_post) = theta0 + phi_da; a DA-QCFS that reached a
                # spike value below 10 % of theta0 starts at 10 % (the moment method's own floor).
                self.log_post.copy_(torch.log(((self.theta0 + phi_da) / self.theta0).clamp(min=0.1)))
                self.psi_da_rel.copy_(psi_da / self.theta0)
            self._start = None

    def parameters_now(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(theta_pre, theta_post, psi_da)``, per channel."""
        theta_pre = self.theta0 * torch.exp(self.log_pre.clamp(-LOG_RANGE, LOG_RANGE))
        theta_post = self.theta0 * torch.exp(self.log_post.clamp(-LOG_RANGE, LOG_RANGE))
        return theta_pre, theta_post, self.psi_da_rel * self.theta0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_pre.numel() == 0:
            self._materialise(x)
        pre, post, psi_da = (p.to(x.dtype) for p in self.parameters_now())
        return daqcfs_fit(x, pre, post, psi_da, self.T, self.shift, self.channel_dim)

    def to_daqcfs(self) -> DAQCFS:
        """The fitted site as a plain DA-QCFS (and from there a parallel neuron)."""
        if self.log_pre.numel() == 0:
            raise RuntimeError("LearnedSite saw no data")
        with torch.no_grad():
            pre, post, psi_da = (p.detach().clone() for p in self.parameters_now())
        return DAQCFS(self.T, pre, psi_da=psi_da, phi_da=post - pre, shift=self.shift, channel_dim=self.channel_dim)


def split_images(batches: Sequence[torch.Tensor], fraction: float) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``(rest, held)``: ``ceil(fraction * n)`` of the ``n`` images, spread evenly over them, and the rest.

    Taking every k-th image rather than the last ones keeps a loader that is sorted (by class, by
    source) represented in both parts. Both parts keep at least one image; the images of a part
    come back as one batch.
    """
    if not batches:
        raise ValueError("no calibration batch to split")
    shapes = sorted({tuple(b.shape[1:]) for b in batches})
    if len(shapes) > 1:
        raise ValueError(f"the calibration batches hold inputs of {len(shapes)} shapes ({shapes[0]}, {shapes[1]}, ...); "
                         "learned, distill and auto keep the images in one tensor: give inputs of one shape")
    images = torch.cat(list(batches))
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"the calibration data holds {n} image; at least 2 are needed to hold some out for "
                         "measuring the fit")
    k = min(n - 1, max(1, math.ceil(n * fraction)))
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.div(torch.arange(k) * n + n // 2, k, rounding_mode="floor").clamp(max=n - 1)] = True
    return [images[~held]], [images[held]]


def _chunks(batches: Sequence[torch.Tensor], size: int) -> List[torch.Tensor]:
    return [c for b in batches for c in torch.split(b, size)]


def take_images(batches: Iterable[torch.Tensor], max_images: Optional[int]) -> List[torch.Tensor]:
    """The first ``max_images`` images of ``batches`` (all of them for ``None``), batch by batch, on the CPU."""
    out: List[torch.Tensor] = []
    n = 0
    for b in batches:
        if max_images is not None and n >= max_images:
            break
        b = b if max_images is None else b[:max_images - n]
        out.append(b.detach().cpu())
        n += b.shape[0]
    return out


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"learned calibration needs a model returning one tensor of logits, got {type(out).__name__}")
    return out.flatten(1) if out.dim() > 2 else out


def _kl(ref: torch.Tensor, out: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    return F.kl_div(F.log_softmax(out.float(), dim=1), F.log_softmax(ref.float(), dim=1), log_target=True,
                    reduction=reduction)


def distillation_kl(ref: torch.Tensor, out: torch.Tensor, temperature: float = 1.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """``temperature**2 * KL(softmax(ref / temperature) || softmax(out / temperature))``, the mean over
    the batch (``reduction="batchmean"``) or the sum (``"sum"``).

    ``ref`` and ``out`` are logits ``[N, classes]`` (the ANN's and the converted network's). The
    square keeps the gradient's scale independent of the temperature (Hinton et al., 2015).
    """
    return _kl(ref / temperature, out / temperature, reduction) * temperature ** 2


@torch.no_grad()
def held_out_score(model: nn.Module, held: Sequence[torch.Tensor], ref_logits: Sequence[torch.Tensor], device,
                   reducer: Reducer = None, hits: Optional[List[torch.Tensor]] = None) -> Dict[str, float]:
    """Agreement of ``model``'s top-1 predictions with the ANN's, and the mean KL, on held-out images.

    Returns ``{"agreement": fraction, "kl": mean KL per image, "images": n}``, summed over
    processes when ``reducer`` is given. A list passed as ``hits`` receives this process's
    per-image agreement (one boolean tensor, images in order), for paired comparisons
    (:func:`~sj_parallel_conversion.selection.choose`).
    """
    kl = n = 0.0
    same: List[torch.Tensor] = []
    for x, ref in zip(held, ref_logits):
        out = _logits(model, x.to(device))
        ref = ref.to(out.device)
        same.append((out.argmax(1) == ref.argmax(1)).cpu())
        kl += float(_kl(ref, out, reduction="sum"))
        n += x.shape[0]
    agree = float(sum(int(s.sum()) for s in same))
    if hits is not None:
        hits.append(torch.cat(same) if same else torch.zeros(0, dtype=torch.bool))
    totals = torch.tensor([agree, kl, n], dtype=torch.float64)
    if reducer is not None:
        totals = reducer(totals, "sum")
    agree, kl, n = (float(v) for v in totals)
    return {"agreement": agree / n, "kl": kl / n, "images": int(n)}


def _site_outputs(model: nn.Module, names: Sequence[str]) -> Tuple[Dict[str, torch.Tensor], List]:
    store: Dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(mod, inp, out, name=name):
            store[name] = out
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    return store, hooks


def _is_image(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[-1] >= 8 and x.shape[-2] >= 8


def _set_site(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


def _install_sites(gm: fx.GraphModule, reference: nn.Module, site_names: Sequence[str],
                   T_of: Callable[[str], int]) -> Dict[str, LearnedSite]:
    """Put a :class:`LearnedSite` at every site of ``gm`` and freeze both networks' parameters."""
    sites: Dict[str, LearnedSite] = {}
    for name in site_names:
        sites[name] = LearnedSite(gm.get_submodule(name), T_of(name))
        _set_site(gm, name, sites[name])
    gm.eval()
    reference.eval()
    for p in list(gm.parameters()) + list(reference.parameters()):
        p.requires_grad_(False)
    return sites


def _with_views(fit: Sequence[torch.Tensor], options: LearnedCalibration) -> Tuple[List[torch.Tensor], int]:
    """The fitting images followed by ``options.views`` cropped and flipped copies of each (images only)."""
    views = options.views if all(_is_image(x) for x in fit) else 0
    fit = list(fit)
    if views:
        gen = torch.Generator().manual_seed(options.seed + 1)
        fit += [random_crop_flip(x, max(1, x.shape[-1] // 8), gen) for _ in range(views) for x in fit]
    return fit, views


def _site_parameters(sites: Dict[str, LearnedSite]) -> List[nn.Parameter]:
    return [p for s in sites.values() for p in (s.log_pre, s.log_post, s.psi_da_rel)]


def _average_gradients(params: Sequence[nn.Parameter], reducer: Reducer, world: float) -> None:
    """Under torch.distributed, every process steps with the mean of all processes' gradients."""
    if reducer is None:
        return
    for p in params:
        if p.grad is not None:
            p.grad = reducer(p.grad, "sum") / world


def fall_back_margin(score: Dict[str, float]) -> float:
    """How far below the start's held-out agreement a fit may end before the start is returned.

    Two standard errors of the start's agreement ``p`` on ``n`` items, ``2 * sqrt(p (1 - p) / n)``,
    and at least one item: a few hundred held-out *training* images measure the agreement
    coarsely (the ANN is more confident on them than on new images, so a start can look as good
    as a fit that is several points better on test images), while the failures the fall-back is
    for (a fit that flattens the logits) lose tens of points. With blends among the items
    (``fall_back_blends``) the items are not independent, and the margin is narrower than two
    standard errors of the images behind them.
    """
    p, n = score["agreement"], max(1, int(score["images"]))
    return max(1.0 / n, 2.0 * math.sqrt(p * (1.0 - p) / n))


class _FallBack:
    """The fit's fall-back: scores the start on the held-out images and ``options.fall_back_blends``
    blends of each (the held-out score itself where there are none), and at the end returns to the
    start where the fit agrees with the ANN clearly less often there (:func:`fall_back_margin`)."""

    def __init__(self, gm: nn.Module, held_chunks: Sequence[torch.Tensor], held_ref: Sequence[torch.Tensor],
                 initial: Dict, reference: nn.Module, options: LearnedCalibration, device, reducer: Reducer) -> None:
        self.chunks, self.refs = list(held_chunks), list(held_ref)
        self.device, self.reducer, self.blended = device, reducer, bool(options.fall_back_blends and held_chunks)
        if self.blended:
            held = torch.cat(self.chunks)
            mixed = with_blends(held, options.fall_back_blends, options.seed + 2)[held.shape[0]:]
            with torch.no_grad():
                for c in torch.split(mixed, max(1, options.batch_size)):
                    self.chunks.append(c)
                    self.refs.append(_logits(reference, c.to(device)))
        self.start = self._score(gm) if self.blended else initial

    def _score(self, gm: nn.Module) -> Dict:
        return held_out_score(gm, self.chunks, self.refs, self.device, self.reducer)

    def finish(self, gm: fx.GraphModule, sites: Dict[str, LearnedSite], params: Sequence[nn.Parameter],
               initial_state: List[torch.Tensor], best: Dict, label: str, history: Dict) -> bool:
        """Fall back if need be (``best``: the fit's held-out score), make the sites DA-QCFS, record
        both scores in ``history["fall_back_check"]``; returns whether it fell back."""
        end = self._score(gm) if self.blended else best
        history["fall_back_check"] = {"start": self.start, "fit": end}
        fell_back = end["agreement"] < self.start["agreement"] - fall_back_margin(self.start)
        if fell_back:
            # The held-out KL can fall while the ranking of the classes gets worse (a fit that
            # flattens the logits); a network that agrees with the ANN clearly less than the start
            # is never returned.
            logger.warning("%s: the fit agreed with the ANN on %.1f %% of %d held-out items against %.1f %% at its "
                           "start; keeping the start", label, 100 * end["agreement"], end["images"],
                           100 * self.start["agreement"])
            with torch.no_grad():
                for p, v in zip(params, initial_state):
                    p.copy_(v)
        for p in params:
            p.requires_grad_(False)
        for name, site in sites.items():
            _set_site(gm, name, site.to_daqcfs())
        return fell_back


def _cat_apply(module: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(c) for c in torch.split(x, size)])


class BlockCacheTooLarge(ValueError):
    """The activations a block-wise fit keeps would exceed ``cache_gib``."""


def check_block_cache(blocks: Sequence[Tuple[str, nn.Module]], probe: torch.Tensor, images: int, cache_gib: float) -> int:
    """Bytes the block-wise fit keeps for ``images`` inputs; raise :class:`BlockCacheTooLarge` above ``cache_gib``.

    The fit keeps three tensors of the widest block boundary for every image (the converted
    network's and the ANN's inputs of the block, and the ANN's output), measured on ``probe``
    (one input).
    """
    widest = 0
    with torch.no_grad():
        x = probe
        for _, block in blocks:
            x = block(x)
            if isinstance(x, torch.Tensor):
                widest = max(widest, x[:1].numel() * x.element_size())
    need = 3 * widest * images
    if need > cache_gib * 2 ** 30:
        raise BlockCacheTooLarge(
            f"block-wise fitting would keep {need / 2 ** 30:.1f} GiB of activations ({images} images and views, "
            f"{widest / 2 ** 20:.1f} MiB per image at the widest block) over cache_gib={cache_gib:g}; lower "
            "max_images or views, raise cache_gib, or fit with scope='network'")
    return need


def _fit_blocks(gm: fx.GraphModule, reference: nn.Module, fit: Sequence[torch.Tensor], held: Sequence[torch.Tensor],
                sites: Dict[str, LearnedSite], views: int, options: LearnedCalibration, device, reducer: Reducer,
                progress: bool, label: str, start: float) -> Tuple[fx.GraphModule, Dict]:
    """``scope="blocks"`` of :func:`learn_calibration`: reconstruct each block's output in turn."""
    x_fit = torch.cat(list(fit)).to(device)
    x_held = torch.cat(list(held)).to(device)
    size = options.batch_size
    with torch.no_grad():
        gm(x_fit[:1])  # materialise the per-channel parameters
    boundaries = block_boundaries(gm, list(sites))
    ours = split_blocks(gm, list(sites), boundaries)
    check_block_cache(ours, x_fit[:1], x_fit.shape[0] + x_held.shape[0], options.cache_gib)
    held_chunks = list(torch.split(x_held, size))
    with torch.no_grad():
        held_ref = [_logits(reference, c) for c in held_chunks]
    site_params = _site_parameters(sites)
    site_ids = {id(p) for p in site_params}
    params = site_params + [p for p in gm.parameters() if id(p) not in site_ids]
    initial = held_out_score(gm, held_chunks, held_ref, device, reducer)
    fall_back = _FallBack(gm, held_chunks, held_ref, initial, reference, options, device, reducer)
    initial_state = [p.detach().clone() for p in params]
    reference_nodes = {n.name for n in reference.graph.nodes} if isinstance(reference, fx.GraphModule) else set()
    if not set(boundaries) <= reference_nodes:
        raise RuntimeError("the ANN's graph does not match the converted network's; cannot fit block by block")
    theirs = split_blocks(reference, list(sites), boundaries)
    logger.info("%s: %d blocks, %d fitting and %d held-out images (%.1f s)", label, len(ours), x_fit.shape[0],
                x_held.shape[0], time.perf_counter() - start)
    world = 1.0
    if reducer is not None:
        world = float(reducer(torch.ones((), dtype=torch.float64), "sum"))
    gen = torch.Generator().manual_seed(options.seed)
    # Inputs of the current block: from the converted blocks before it (q) and from the ANN (a).
    q_fit, a_fit, q_held, a_held = x_fit, x_fit, x_held, x_held
    history: Dict = {"blocks": [], "held_out_agreement": [(0, initial["agreement"])], "cuts": []}
    bar = progress_bar(range(len(ours) * options.steps), label, progress)
    try:
        for index, ((name, block), (_, twin)) in enumerate(zip(ours, theirs)):
            last = index == len(ours) - 1
            target, held_target = _cat_apply(twin, a_fit, size), _cat_apply(twin, a_held, size)
            members = {id(m) for m in block.modules()}
            own_sites = _site_parameters({n: s for n, s in sites.items() if id(s) in members})
            own_ids = {id(p) for p in own_sites}
            weights = [p for p in block.parameters() if id(p) not in own_ids and id(p) not in site_ids]
            groups = [g for g in ({"params": own_sites, "lr": options.lr},
                                  {"params": weights, "lr": options.weight_lr}) if g["params"] and g["lr"] > 0]
            if not groups:
                bar.update(options.steps)
            else:
                record = _fit_block(block, groups, q_fit, a_fit, target, q_held, held_target, last, options, gen,
                                    reducer, world, bar, index == 0)
                record["block"] = name
                history["blocks"].append(record)
                logger.debug("%s: block %s, held-out error %.4g -> %.4g (step %d)", label, name, record["start"],
                             record["best"], record["kept_step"])
            if not last:
                q_fit, q_held = _cat_apply(block, q_fit, size), _cat_apply(block, q_held, size)
                a_fit, a_held = target, held_target
    finally:
        bar.close()
    best = held_out_score(gm, held_chunks, held_ref, device, reducer)
    history["held_out_agreement"].append((len(ours) * options.steps, best["agreement"]))
    fell_back = fall_back.finish(gm, sites, params, initial_state, best, label, history)
    best = initial if fell_back else best
    history.update(kept_step=0 if fell_back else len(ours) * options.steps, steps_run=len(ours) * options.steps,
                   seconds=time.perf_counter() - start, views=views, fell_back=fell_back,
                   fit_images=int(x_fit.shape[0]), held_out_images=int(x_held.shape[0]), options=asdict(options))
    logger.info("%s: %d blocks fitted, held-out agreement %.1f %% (start %.1f %%), %.0f s", label, len(ours),
                100 * best["agreement"], 100 * initial["agreement"], history["seconds"])
    return gm, history


def _fit_block(block: nn.Module, groups: List[Dict], q_in: torch.Tensor, a_in: torch.Tensor, target: torch.Tensor,
               held_in: torch.Tensor, held_target: torch.Tensor, last: bool, options: LearnedCalibration,
               gen: torch.Generator, reducer: Reducer, world: float, bar, first: bool) -> Dict:
    """Fit one block's parameters so that ``block(input)`` matches ``target``; keep the best held-out step."""
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    for g in groups:
        g["peak"] = g["lr"]
    opt = torch.optim.Adam(groups)

    def error(out: torch.Tensor, ref: torch.Tensor, reduction: str = "mean", fitting: bool = False) -> torch.Tensor:
        # The head (whose output is the logits) is fitted with the options' loss; the held-out
        # score that steers every fit is the plain KL, as in the whole-network fit.
        if last and not (fitting and options.loss == "mse"):
            return distillation_kl(ref, out, options.temperature if fitting else 1.0,
                                   "batchmean" if reduction == "mean" else "sum")
        err = F.mse_loss(out.float(), ref.float(), reduction="none").flatten(1).mean(1)
        return err.mean() if reduction == "mean" else err.sum()

    @torch.no_grad()
    def held_error() -> float:
        total = torch.zeros(2, dtype=torch.float64)
        for x, ref in zip(torch.split(held_in, options.batch_size), torch.split(held_target, options.batch_size)):
            total += torch.tensor([float(error(block(x), ref, "sum")), x.shape[0]], dtype=torch.float64)
        if reducer is not None:
            total = reducer(total, "sum")
        return float(total[0] / total[1])

    best = begin = held_error()
    best_state, best_step = [p.detach().clone() for p in params], 0
    n = q_in.shape[0]
    for step in range(options.steps):
        # A cosine decay instead of plateau cuts: a block is small, its fit short and smooth.
        scale = 0.5 * (1 + math.cos(math.pi * step / options.steps))
        for g in opt.param_groups:
            g["lr"] = g["peak"] * scale
        idx = torch.randint(0, n, (min(options.batch_size, n),), generator=gen).to(q_in.device)
        x = q_in[idx]
        if options.mix > 0 and not first:
            keep_ann = torch.rand(x.shape, generator=gen).to(x.device) < options.mix
            x = torch.where(keep_ann, a_in[idx], x)
        loss = error(block(x), target[idx], fitting=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(params, reducer, world)
        opt.step()
        bar.update(1)
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            now = held_error()
            if now < best:
                best, best_step = now, step + 1
                best_state = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    for p in params:
        p.requires_grad_(False)
    return {"start": begin, "best": best, "kept_step": best_step}


def learn_calibration(
    gm: fx.GraphModule,
    reference: nn.Module,
    fit: Sequence[torch.Tensor],
    held: Sequence[torch.Tensor],
    T_of: Callable[[str], int],
    site_names: Sequence[str],
    options: LearnedCalibration,
    device,
    reducer: Reducer = None,
    progress: bool = True,
    label: str = "learned",
) -> Tuple[fx.GraphModule, Dict]:
    """Fit every site of ``gm`` (ClipReLU, QCFS or DA-QCFS sites), and its weights when
    ``options.weight_lr > 0``, to the ANN's outputs, in place.

    ``reference`` is the ANN (same graph, original activations); ``fit`` and ``held`` are input
    tensors (on any device): the fit steps on ``fit``, and ``held`` alone decides which parameters
    are kept, when the step size is cut and when the fit stops. The fit never returns a network
    that agrees with the ANN clearly less often than its starting point on ``held`` and
    ``options.fall_back_blends`` blends of each (:func:`fall_back_margin`): it then returns the start (``history["fell_back"]``) and logs one warning. Returns ``gm`` with DA-QCFS sites and a
    history dict (held-out KL and agreement per evaluation, the step kept, steps run, seconds).
    """
    options.check()
    start = time.perf_counter()
    sites = _install_sites(gm, reference, site_names, T_of)
    fit, views = _with_views(fit, options)
    if options.scope == "blocks":
        return _fit_blocks(gm, reference, fit, held, sites, views, options, device, reducer, progress, label, start)
    chunks = _chunks(fit, options.batch_size)
    held_chunks = _chunks(held, options.batch_size)
    with torch.no_grad():
        gm(chunks[0][:1].to(device))  # materialise the per-channel parameters
        # The ANN's outputs are fixed: computed once per image, not at every step.
        fit_ref = [_logits(reference, c.to(device)) for c in chunks]
        held_ref = [_logits(reference, c.to(device)) for c in held_chunks]
    logger.info("%s: %d fitting and %d held-out images, ANN outputs ready (%.1f s)", label,
                sum(int(c.shape[0]) for c in chunks), sum(int(c.shape[0]) for c in held_chunks),
                time.perf_counter() - start)
    site_params = _site_parameters(sites)
    weight_params: List[nn.Parameter] = []
    if options.weight_lr > 0:
        ids = {id(p) for p in site_params}
        weight_params = [p for p in gm.parameters() if id(p) not in ids]
    params = site_params + weight_params
    for p in params:
        p.requires_grad_(True)
    world = 1.0
    if reducer is not None:
        counts = reducer(torch.tensor([1.0, float(len(chunks))], dtype=torch.float64), "sum")
        world = float(counts[0])
        if float(counts[1]) != world * len(chunks):
            raise ValueError("learned calibration under torch.distributed needs the same number of calibration "
                             f"minibatches on every process (this one has {len(chunks)}); shard the data evenly")
    groups = [{"params": site_params, "lr": options.lr}]
    if weight_params:
        groups.append({"params": weight_params, "lr": options.weight_lr})
    for group in groups:
        group["peak"] = group["lr"]
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(options.seed)
    site_store, hooks, ref_store, ref_hooks = {}, [], {}, []
    if options.loss == "kl+sites":
        site_store, hooks = _site_outputs(gm, list(sites))
        ref_store, ref_hooks = _site_outputs(reference, list(sites))

    def snapshot():
        return [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore(state):
        for p, v in zip(params, state):
            p.copy_(v)

    initial = best = held_out_score(gm, held_chunks, held_ref, device, reducer)
    fall_back = _FallBack(gm, held_chunks, held_ref, initial, reference, options, device, reducer)
    initial_state = best_state = snapshot()
    best_step = 0
    history = {"held_out_kl": [(0, best["kl"])], "held_out_agreement": [(0, best["agreement"])], "cuts": []}
    order: List[int] = []
    bad = 0
    step = 0
    scale = 1.0  # the plateau cuts' factor on every group's rate
    bar = progress_bar(range(options.steps), label, progress)
    try:
        for step in bar:
            # Adam's first steps move every parameter by about the full rate in the direction of a
            # noisy gradient; on deep networks at small T that alone can leave the start's basin.
            ramp = min(1.0, (step + 1) / options.warmup) if options.warmup else 1.0
            for group in opt.param_groups:
                group["lr"] = group["peak"] * scale * ramp
            if not order:
                order = torch.randperm(len(chunks), generator=gen).tolist()
            i = order.pop()
            x = chunks[i].to(device)
            out = _logits(gm, x)
            if options.loss == "mse":
                loss = F.mse_loss(out.float(), fit_ref[i].float())
            else:
                loss = distillation_kl(fit_ref[i], out, options.temperature)
            if options.loss == "kl+sites":
                with torch.no_grad():
                    reference(x)
                terms = [F.mse_loss(site_store[n], ref_store[n]) / ref_store[n].pow(2).mean().clamp(min=1e-12)
                         for n in sites]
                loss = loss + options.site_weight * torch.stack(terms).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(params, reducer, world)
            opt.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", held_kl=f"{best['kl']:.4f}")
            if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
                score = held_out_score(gm, held_chunks, held_ref, device, reducer)
                history["held_out_kl"].append((step + 1, score["kl"]))
                history["held_out_agreement"].append((step + 1, score["agreement"]))
                logger.debug("%s: step %d, held-out KL %.4f, agreement %.1f %% (%.0f s)", label, step + 1, score["kl"],
                             100 * score["agreement"], time.perf_counter() - start)
                if score["kl"] < best["kl"]:
                    best, best_state, best_step, bad = score, snapshot(), step + 1, 0
                    continue
                bad += 1
                if bad < options.patience:
                    continue
                # A plateau: the fit stops improving at this step size, either because the steps
                # are too coarse to settle or because it begins to fit the fitting images' noise.
                # Back to the best parameters with smaller steps, as long as cuts remain; how long
                # that takes adapts to the network and T instead of a fixed step budget.
                if len(history["cuts"]) >= options.cuts or step + 1 >= options.steps:
                    break
                history["cuts"].append(step + 1)
                logger.info("%s: plateau at step %d, back to step %d (held-out agreement %.1f %%), rate x%g (%.0f s)",
                            label, step + 1, best_step, 100 * best["agreement"], options.decay,
                            time.perf_counter() - start)
                bad = 0
                restore(best_state)
                # Adam's moment estimates are kept: they still describe the gradients near the best
                # parameters, and the smaller rate bounds how far they carry the fit.
                scale *= options.decay
    finally:
        bar.close()
        for h in hooks + ref_hooks:
            h.remove()
    restore(best_state)
    fell_back = fall_back.finish(gm, sites, params, initial_state, best, label, history)
    best = initial if fell_back else best
    best_step = 0 if fell_back else best_step
    history.update(kept_step=best_step, steps_run=step + 1, seconds=time.perf_counter() - start, views=views,
                   fell_back=fell_back, fit_images=sum(int(c.shape[0]) for c in chunks),
                   held_out_images=sum(int(c.shape[0]) for c in held_chunks), options=asdict(options))
    logger.info("%s: kept step %d of %d, held-out agreement %.1f %% (start %.1f %%), %.0f s", label, best_step,
                step + 1, 100 * best["agreement"], 100 * initial["agreement"], history["seconds"])
    return gm, history
