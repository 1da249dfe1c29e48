"""Reference backend: the closed form in plain torch operations (CPU and CUDA)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import formulas


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of low-precision inputs are taken in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements per block of the blocked loops below: the running sum (or output rows) of one block
# stay in the CPU cache across the T steps, instead of one pass over memory per step.
BLOCK = 1 << 17


def flat_steps(x: torch.Tensor):
    """``x`` ``[T, ...]`` as a ``[T, M]`` view in memory order, or ``None`` when its steps are not
    dense with one shared layout (then the callers work step by step)."""
    if x.dim() < 2 or x.stride() != formulas.step_strides(x[0], x.shape[0]):
        return None
    return x.as_strided((x.shape[0], x[0].numel()), (x[0].numel(), 1))


def time_mean(x_seq: torch.Tensor) -> torch.Tensor:
    """Mean over the leading time axis, summed step after step in the accumulation dtype.

    The sequential order is the canonical one: the cupy kernel sums in the same order, so the
    two backends produce the same bits. Dense CPU inputs are summed block by block (the same
    additions, in the same order for every element) so that the running sum stays in cache; on
    a GPU that would be thousands of tiny launches, so there every step is one addition.
    """
    n = x_seq.shape[0]
    acc = x_seq[0].to(accumulation_dtype(x_seq.dtype), copy=True)
    flat_x, flat_acc = flat_steps(x_seq), flat_steps(acc.unsqueeze(0))
    if (n > 1 and acc.device.type == "cpu" and flat_x is not None and flat_acc is not None
            and acc.numel() > BLOCK):
        flat_acc = flat_acc[0]
        for s in range(0, flat_acc.numel(), BLOCK):
            a = flat_acc[s:s + BLOCK]
            for t in range(1, n):
                a += flat_x[t, s:s + BLOCK]
    else:
        for t in range(1, n):
            acc += x_seq[t]
    return formulas.divide_(acc, n)  # acc is our own buffer: divide in place


def fire(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int, order: str,
         check_nan: bool = False) -> torch.Tensor:
    """Spikes ``[T, N, ...]`` in ``x_seq.dtype`` from currents ``[T_in, N, ...]``.

    ``params`` is ``(theta_pre, psi, psi_da, spike_value)``, each a scalar or per-channel tensor
    (one tuple, so that the operator, both backends and the tests pass the four in one order).
    """
    m = time_mean(x_seq)
    if check_nan and bool(torch.isnan(m).any()):
        from . import NaNMeanError

        raise NaNMeanError("NaN time-mean current")
    acc = m.dtype
    nd = m.dim()

    def cv(p: torch.Tensor):
        return formulas.channel_view(p.to(dtype=acc, device=m.device), nd, channel_dim)

    theta_pre, psi, psi_da, spike_value = params
    # m is this function's own buffer, so the count may overwrite it.
    k = formulas.spike_count(m, T, cv(theta_pre), cv(psi), cv(psi_da), inplace=True)
    sv = cv(spike_value)
    out = spikes_blocked(k, T, sv, order)
    if out is None:
        out = formulas.spikes_from_count(k, T, sv, order)
    return out if out.dtype == x_seq.dtype else out.to(x_seq.dtype)


def spikes_blocked(k: torch.Tensor, T: int, spike_value: torch.Tensor, order: str):
    """:func:`.formulas.spikes_from_count` for large dense CPU counts, block by block, or ``None``.

    The output ``[T, ...]`` is the node's largest memory traffic. Writing the 0/1 comparison for
    all steps and then multiplying by the spike value costs two passes over it; here both run on
    one cache-sized block of neurons at a time, so the output is written to memory once (the
    same two operations per element, hence the same values).
    """
    if k.device.type != "cpu" or torch.compiler.is_compiling() or k.numel() <= BLOCK:
        return None
    flat_k = flat_steps(k.unsqueeze(0))
    if flat_k is None:
        return None
    sv = torch.empty_like(k).copy_(torch.broadcast_to(spike_value, k.shape))
    out = torch.empty_strided((T,) + tuple(k.shape), formulas.step_strides(k, T), dtype=k.dtype, device=k.device)
    flat_k, flat_sv, flat_out = flat_k[0], flat_steps(sv.unsqueeze(0))[0], flat_steps(out)
    late = order == "late"
    for s in range(0, flat_k.numel(), BLOCK):
        kb, svb = flat_k[s:s + BLOCK], flat_sv[s:s + BLOCK]
        for t in range(T):
            o = flat_out[t, s:s + BLOCK]
            # late: step t (0-based) fires when t >= T - k; early: when t < k.
            if late:
                torch.ge(kb, T - t, out=o)
            else:
                torch.gt(kb, t, out=o)
            o.mul_(svb)
    return out
