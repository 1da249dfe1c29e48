"""Backend dispatch for the parallel conversion neuron.

One entry point, :func:`fire`, picks a backend (``"torch"``, ``"cupy"`` or ``"auto"``) and runs
it inside an autograd function whose backward raises: the node is an inference operator and
silently returning zero gradients through ``floor`` would be wrong.
"""
from __future__ import annotations

import warnings

import torch

from . import cupy_backend, torch_backend

BACKENDS = ("auto", "torch", "cupy")


class NaNMeanError(ArithmeticError):
    """A neuron's time-mean input is NaN (raised by a backend when asked to check)."""
_warned_fallback = False


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map a requested backend to the one that will run on ``x``, or raise why it cannot."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "cupy":
        if not x.is_cuda:
            raise ValueError(
                f"backend='cupy' needs a CUDA tensor, got one on {x.device}; "
                "use backend='torch' or 'auto' for CPU tensors"
            )
        reason = cupy_backend.availability()
        if reason is not None:
            raise RuntimeError(f"backend='cupy' is unavailable: {reason}")
        return "cupy"
    # auto
    if not x.is_cuda:
        return "torch"
    reason = cupy_backend.availability()
    if reason is None:
        return "cupy"
    if not _warned_fallback:
        warnings.warn(f"backend='auto': {reason}; using the torch backend", RuntimeWarning, stacklevel=3)
        _warned_fallback = True
    return "torch"


_IMPL = {"torch": torch_backend.fire, "cupy": cupy_backend.fire}


class _Fire(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_seq, theta_pre, psi, psi_da, spike_value, T, channel_dim, order, impl, check_nan):
        return _IMPL[impl](x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, order, check_nan)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "ParallelConversionNode is an inference-only operator: its spikes are a step function "
            "of the input and have no useful gradient. Train the ANN (QCFS/ReLU) and convert it."
        )


def fire(
    x_seq: torch.Tensor,
    T: int,
    theta_pre: torch.Tensor,
    psi: torch.Tensor,
    psi_da: torch.Tensor,
    spike_value: torch.Tensor,
    channel_dim: int = 1,
    order: str = "late",
    backend: str = "auto",
    check_nan: bool = False,
) -> torch.Tensor:
    """Spikes ``[T, N, ...]`` of parallel conversion neurons for currents ``[T_in, N, ...]``.

    With ``check_nan`` a NaN time mean raises :class:`NaNMeanError`.
    """
    impl = resolve_backend(backend, x_seq)
    needs_graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_seq, theta_pre, psi, psi_da, spike_value)
    )
    if needs_graph:
        return _Fire.apply(x_seq, theta_pre, psi, psi_da, spike_value, T, channel_dim, order, impl, check_nan)
    return _IMPL[impl](x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, order, check_nan)
