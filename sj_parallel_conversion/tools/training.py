"""A small, dependable training loop for the demo, the examples and the tests."""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import progress as progress_bar

__all__ = ["train_classifier"]


def train_classifier(
    model: nn.Module,
    loader: Iterable,
    epochs: int,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    device="cpu",
    progress: bool = True,
    augment=None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    start_epoch: int = 0,
    on_epoch_end=None,
) -> nn.Module:
    """SGD with cosine annealing (the paper's A.2 recipe) on ``(x, y)`` batches.

    ``augment(x) -> x`` is applied to every training batch; ``on_epoch_end(epoch, model,
    optimizer, scheduler)`` is called after each epoch (checkpointing, evaluation).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = scheduler or torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(start_epoch, epochs):
        model.train()
        bar = progress_bar(loader, f"epoch {epoch + 1}/{epochs}", progress)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x)
            loss = F.cross_entropy(model(x), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {loss.item()})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        sched.step()
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, opt, sched)
    model.eval()
    return model
