"""The reference implementation: the closed form in plain torch operations (any device and dtype).

The fused kernels (:mod:`.native_backend`, :mod:`.cupy_backend`) mirror these functions
operation by operation and are tested against them bit for bit. :func:`fire` is the neuron and
:func:`count` the count domain's quantiser; both count with :func:`.formulas.spike_count` in the
accumulation dtype, so a half precision count equals the spikes fired for the same mean.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import formulas
from ..formulas import BLOCK

__all__ = ["accumulation_dtype", "flat_steps", "time_mean", "count", "fire", "BLOCK"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of low-precision inputs are taken in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_steps(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x`` ``[T, ...]`` as a ``[T, M]`` view in memory order, or ``None`` when its steps are not
    dense with one shared layout (then the callers work step by step)."""
    if x.dim() < 2 or x.stride() != formulas.step_strides(x[0], x.shape[0]):
        return None
    return x.as_strided((x.shape[0], x[0].numel()), (x[0].numel(), 1))


def time_mean(x_seq: torch.Tensor) -> torch.Tensor:
    """Mean over the leading time axis, summed step after step in the accumulation dtype.

    The sequential order is the canonical one: the fused kernels sum in the same order, so all
    implementations produce the same bits. Dense CPU inputs are summed block by block (the same
    additions, in the same order for every element) so that the running sum stays in cache; on
    a GPU that would be thousands of tiny launches, so there every step is one addition.
    """
    n = x_seq.shape[0]
    acc = x_seq[0].to(accumulation_dtype(x_seq.dtype), copy=True)
    flat_x, flat_acc = flat_steps(x_seq), flat_steps(acc.unsqueeze(0))
    if (n > 1 and acc.device.type == "cpu" and flat_x is not None and flat_acc is not None
            and acc.numel() > BLOCK and not torch.compiler.is_compiling()):
        flat_acc = flat_acc[0]
        for s in range(0, flat_acc.numel(), BLOCK):
            a = flat_acc[s:s + BLOCK]
            for t in range(1, n):
                a += flat_x[t, s:s + BLOCK]
    else:
        for t in range(1, n):
            acc += x_seq[t]
    return formulas.divide_(acc, n)  # acc is our own buffer: divide in place


def count(mean_current: torch.Tensor, T: int, params: Sequence[torch.Tensor], scale: Optional[torch.Tensor],
          channel_dim: int, inplace: bool = False) -> torch.Tensor:
    """Spike counts (times ``scale`` when given) of time means ``[N, ...]`` in their dtype.

    ``params`` is ``(theta_pre, psi, psi_da)``, each a scalar or per-channel 1-D tensor. The
    count is taken in the accumulation dtype, as :func:`fire` takes it, and rounded once to a
    half precision input's dtype. Parameters go to the input's device, where dividing by them is
    IEEE division (a CPU scalar divisor would be multiplied by its reciprocal on CUDA).
    """
    work = accumulation_dtype(mean_current.dtype)
    nd = mean_current.dim()
    cv = [formulas.channel_view(p.to(dtype=work, device=mean_current.device), nd, channel_dim)
          for p in (*params, *(() if scale is None else (scale,)))]
    sc = cv[3] if scale is not None else None
    if work == mean_current.dtype:
        return formulas.spike_count(mean_current, T, *cv[:3], inplace=inplace, scale=sc)
    k = formulas.spike_count(mean_current.to(work), T, *cv[:3], inplace=True, scale=sc)
    if inplace and not formulas.needs_grad(mean_current, k):
        return mean_current.copy_(k)
    return k.to(mean_current.dtype)


def fire(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int, late: bool,
         nan_seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Spikes ``[T, N, ...]`` in ``x_seq.dtype`` from currents ``[T_in, N, ...]``.

    ``params`` is ``(theta_pre, psi, psi_da, spike_value)``, each a scalar or per-channel tensor
    (one tuple, so that the operator and every implementation pass the four in one order).
    ``late`` fires the last ``k`` steps of a train, else the first ``k``. ``nan_seen`` (an int32
    tensor, when given) is set to 1 where a time mean is NaN, as the fused kernels set it.
    """
    m = time_mean(x_seq)
    if nan_seen is not None:
        nan_seen.bitwise_or_(torch.isnan(m).any())
    theta_pre, psi, psi_da, spike_value = params
    # m is this function's own buffer, so the count may overwrite it.
    k = count(m, T, (theta_pre, psi, psi_da), None, channel_dim, inplace=True)
    sv = formulas.channel_view(spike_value.to(dtype=m.dtype, device=m.device), m.dim(), channel_dim)
    out = formulas.spikes_from_count(k, T, sv, "late" if late else "early")
    return out if out.dtype == x_seq.dtype else out.to(x_seq.dtype)
