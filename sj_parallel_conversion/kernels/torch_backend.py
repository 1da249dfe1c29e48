"""Reference backend: the closed form in plain torch operations (CPU and CUDA)."""
from __future__ import annotations

import torch

from .. import formulas


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of low-precision inputs are taken in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def time_mean(x_seq: torch.Tensor) -> torch.Tensor:
    """Mean over the leading time axis, summed step after step in the accumulation dtype.

    The sequential order is the canonical one: the cupy kernel sums in the same order, so the
    two backends produce the same bits.
    """
    acc = x_seq[0].to(accumulation_dtype(x_seq.dtype), copy=True)
    for t in range(1, x_seq.shape[0]):
        acc += x_seq[t]
    return acc.div_(x_seq.shape[0])  # acc is our own buffer: divide in place


def fire(
    x_seq: torch.Tensor,
    T: int,
    theta_pre: torch.Tensor,
    psi: torch.Tensor,
    psi_da: torch.Tensor,
    spike_value: torch.Tensor,
    channel_dim: int,
    order: str,
    check_nan: bool = False,
) -> torch.Tensor:
    """Spikes ``[T, N, ...]`` in ``x_seq.dtype`` from currents ``[T_in, N, ...]``."""
    m = time_mean(x_seq)
    if check_nan and bool(torch.isnan(m).any()):
        from . import NaNMeanError

        raise NaNMeanError("NaN time-mean current")
    acc = m.dtype
    nd = m.dim()

    def cv(p: torch.Tensor):
        return formulas.channel_view(p.to(dtype=acc, device=m.device), nd, channel_dim)

    # m is this function's own buffer, so the count may overwrite it.
    k = formulas.spike_count(m, T, cv(theta_pre), cv(psi), cv(psi_da), inplace=True)
    out = formulas.spikes_from_count(k, T, cv(spike_value), order)
    return out if out.dtype == x_seq.dtype else out.to(x_seq.dtype)
