"""Image augmentation the calibration fits use to see more views of few images (and the
training loaders of :mod:`~sj_parallel_conversion.tools.data` reuse)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["random_crop_flip", "blends", "with_blends"]


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Batched CIFAR-style augmentation of ``[B, C, H, W]``: random crop after zero padding, then a
    random horizontal flip (each with its own draw per image)."""
    b, c, h, w = x.shape
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h)).to(x.device)  # [B, H]
        cols = (ox[:, None] + torch.arange(w)).to(x.device)  # [B, W]
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def blends(x: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``k`` convex blends of every item of ``x`` (``[N, ...]``) with another item, ``[k * N, ...]``.

    Blend ``r`` (``r = 1 .. k``) of item ``i`` is ``w * x[i] + (1 - w) * x[j]`` with
    ``w = 1 - r / (k + 1)`` and ``j`` the item ``r`` places after ``i`` in one random order, so
    every item is blended with ``k`` different partners where ``N > k`` (with fewer, some blends
    repeat or are the item itself; with ``N = k + 1`` an item and its partner ``j`` at weight ``w``
    give the same row as ``j`` and its partner ``i`` at ``1 - w``), and row ``(r - 1) * N + i``
    belongs to item ``i``.
    """
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(x.device)
    place = torch.empty_like(order)
    place[order] = torch.arange(n, device=x.device)
    out = []
    for r in range(1, k + 1):
        partner = order[(place + r) % n]
        w = 1.0 - r / (k + 1)
        out.append(w * x + (1.0 - w) * x[partner])
    return torch.cat(out) if out else x[:0]


def with_blends(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``x`` followed by its :func:`blends` (``k`` per item, partners drawn with ``seed``): the
    items a calibration is judged on. The seed has its own generator, so judging never moves
    the draws of a fit."""
    if not k:
        return x
    return torch.cat([x, blends(x, k, torch.Generator().manual_seed(seed))])
