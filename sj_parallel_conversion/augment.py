"""Image augmentation the calibration fits use to see more views of few images (and the
training loaders of :mod:`~sj_parallel_conversion.tools.data` reuse)."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["random_crop_flip"]


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
