"""The mathematics of parallel conversion, as pure functions on tensors.

Every module of the package computes through these functions, and the tests hold them against
each other: the closed form (:func:`spike_count` + :func:`spikes_from_count`) against the paper's
step/matrix form (:func:`matrix_form_spikes`, Eq. 8 with the shift vector of Theorem 4.1) and
the binary search for the first spike (:func:`first_spike_time`, paper 4.3).

Notation (as on the theory page of the docs): ``T`` output time steps, ``L`` the QCFS quantisation level,
``theta`` a threshold, ``psi`` the absolute shift (``theta / 2`` by default), ``psi_da`` and
``phi_da`` the DA-QCFS calibration shift and scale. Per-channel quantities are 1-D tensors that
broadcast along ``channel_dim`` of the per-step tensor ``[N, C, ...]``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Scalar = Union[float, int, torch.Tensor]

__all__ = [
    "channel_view",
    "floor_ste",
    "qcfs",
    "clip_relu",
    "da_qcfs",
    "spike_count",
    "spike_value",
    "spikes_from_count",
    "SPIKE_ORDERS",
    "check_spike_order",
    "step_strides",
    "divide_",
    "check_channels",
    "needs_grad",
    "parallel_conversion_matrix",
    "shift_vector",
    "matrix_form_spikes",
    "first_spike_time",
]


def needs_grad(*values) -> bool:
    """Whether autograd would record an operation on ``values`` (tensors; other values ignored):
    the test every in-place or fused inference path makes before it may skip autograd."""
    return torch.is_grad_enabled() and any(getattr(v, "requires_grad", False) for v in values)


def check_channels(shape: Sequence[int], channel_dim: int, sizes: Sequence[int], who: str) -> int:
    """The axis of ``shape`` that per-channel parameters of element counts ``sizes`` index.

    Returns ``-1`` when every parameter is a scalar. Raises ``ValueError``, naming ``who``, when
    the counts disagree, ``channel_dim`` is out of range, or that axis has another length: the
    fused kernels index parameters by channel and cannot broadcast, so every caller checks here.
    """
    C = max(sizes, default=1)
    if C == 1:
        return -1
    if any(n not in (1, C) for n in sizes):
        raise ValueError(f"{who}: per-channel parameters of sizes {list(sizes)} disagree on the channel count")
    cd = channel_dim + len(shape) if channel_dim < 0 else channel_dim
    if not 0 <= cd < len(shape):
        raise ValueError(f"{who}: channel_dim={channel_dim} is out of range for shape {tuple(shape)}")
    if shape[cd] != C:
        raise ValueError(f"{who} has {C} per-channel parameters but the input has {shape[cd]} channels along "
                         f"channel_dim={channel_dim} (shape {tuple(shape)})")
    return cd


def channel_view(p: Scalar, ndim: int, channel_dim: int = 1) -> Scalar:
    """Reshape a per-channel 1-D tensor so it broadcasts over a tensor of rank ``ndim``.

    Scalars (Python numbers or 0-d/1-element tensors) are returned unchanged.
    """
    if not isinstance(p, torch.Tensor) or p.dim() == 0 or p.numel() == 1 and p.dim() == 1:
        return p.reshape(()) if isinstance(p, torch.Tensor) else p
    cd = channel_dim if channel_dim >= 0 else channel_dim + ndim
    if not 0 <= cd < ndim:
        raise ValueError(f"channel_dim={channel_dim} is out of range for a rank-{ndim} tensor")
    shape = [1] * ndim
    shape[cd] = p.numel()
    return p.reshape(shape)


def floor_ste(u: torch.Tensor) -> torch.Tensor:
    """``floor(u)`` in the forward pass, identity gradient in the backward pass."""
    return u + (torch.floor(u) - u).detach()


def qcfs(x: torch.Tensor, theta: Scalar, L: int, psi: Scalar, ste: bool = False) -> torch.Tensor:
    """QCFS activation (Bu et al. 2022; paper Eq. 5): ``theta/L * clip(floor((x*L + psi)/theta), 0, L)``.

    With ``ste=True`` the floor passes gradients straight through, so ``x`` and ``theta`` train.
    """
    u = (x * L + psi) / theta
    q = torch.clamp(floor_ste(u) if ste else torch.floor(u), 0, L)
    return theta / L * q


def clip_relu(x: torch.Tensor, theta: Scalar) -> torch.Tensor:
    """``min(max(x, 0), theta)`` (paper 4.2, first stage of training-free conversion)."""
    return torch.minimum(torch.clamp(x, min=0), torch.as_tensor(theta, dtype=x.dtype, device=x.device))


def da_qcfs(
    x: torch.Tensor, theta: Scalar, T: int, psi_da: Scalar, phi_da: Scalar, psi: Scalar, ste: bool = False
) -> torch.Tensor:
    """DA-QCFS (paper Eq. 9): ``(theta+phi_da)/T * clip(floor(((x+psi_da)*T + psi)/theta), 0, T)``.

    With ``ste=True`` the floor passes gradients straight through (learned calibration).
    """
    return spike_value(spike_count(x, T, theta, psi, psi_da, ste=ste), theta, T, phi_da)


def spike_value(k: torch.Tensor, theta: Scalar, T: int, phi_da: Scalar = 0.0,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What ``k`` spikes of a DA-QCFS neuron are worth: ``(theta + phi_da)/T * k`` (written into
    ``out`` when given)."""
    if out is None:
        return (theta + phi_da) / T * k
    return torch.mul((theta + phi_da) / T, k, out=out)


def _broadcasts_into(shape: torch.Size, into: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts against one of shape ``into`` without enlarging it
    (``torch.broadcast_shapes`` says the same but costs a tenth of a millisecond per call)."""
    return len(shape) <= len(into) and all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(into)))


def spike_count(
    mean_current: torch.Tensor, T: int, theta_pre: Scalar, psi: Scalar, psi_da: Scalar = 0.0, ste: bool = False,
    inplace: bool = False, scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Closed-form spike count ``k = clip(floor(((m + psi_da)*T + psi)/theta_pre), 0, T)``.

    ``mean_current`` is the time mean of the neuron's input; the result has its dtype and holds
    integer values. This expression is the single definition both backends implement, operation
    by operation, so that they agree bit for bit. ``ste=True`` gives the floor an identity
    gradient (the values are unchanged). ``inplace=True`` lets the result overwrite
    ``mean_current`` (when no gradient is needed and the parameters broadcast into it).
    ``scale`` (a tensor, no gradient) returns ``k * scale`` instead, multiplied in the same pass
    over memory (the count domain's rate).
    """
    if ste:
        if scale is not None:
            raise ValueError("spike_count: scale is for inference; with ste=True multiply the result instead")
        return torch.clamp(floor_ste(((mean_current + psi_da) * T + psi) / theta_pre), 0, T)
    m = mean_current
    params = [p for p in (psi_da, psi, theta_pre, scale) if torch.is_tensor(p)]
    out_of_place = (
        needs_grad(m, *params)
        or any(p.dtype != m.dtype for p in params)
        or not all(_broadcasts_into(p.shape, m.shape) for p in params)
    )
    if out_of_place:
        k = torch.clamp(torch.floor(((m + psi_da) * T + psi) / theta_pre), 0, T)
        return k if scale is None else k * scale
    # Same operations in the same order, each in place on one buffer: count-domain inference is
    # bound by memory traffic on CPU, and every fresh buffer costs an allocation and page faults.
    rows = _rows_per_chunk(m, params)
    if rows is None:
        u = m.add_(psi_da) if inplace else torch.add(m, psi_da)
        k = u.mul_(T).add_(psi).div_(theta_pre).floor_().clamp_(0, T)
        return k if scale is None else k.mul_(scale)
    u = m if inplace else torch.empty_like(m)
    # Large CPU tensors: the six passes run over one cache-sized slice of the batch at a time, so
    # each slice is read from memory once instead of six times (the same operations per element).
    for s in range(0, m.shape[0], rows):
        src, dst = m[s:s + rows], u[s:s + rows]
        k = torch.add(src, psi_da, out=dst).mul_(T).add_(psi).div_(theta_pre).floor_().clamp_(0, T)
        if scale is not None:
            k.mul_(scale)
    return u


# Bytes of one slice of the chunked in-place count (a share of a typical L2 cache).
_CHUNK_BYTES = 1 << 21


def _rows_per_chunk(m: torch.Tensor, params):
    """Rows of the leading axis per cache-sized slice, or ``None`` to run unchunked (GPU tensors,
    small tensors, parameters that vary along the leading axis, or while ``torch.compile``
    traces, which fuses the passes itself)."""
    if m.device.type != "cpu" or m.dim() < 2 or m.numel() == 0 or torch.compiler.is_compiling():
        return None
    if any(p.dim() == m.dim() and p.shape[0] != 1 for p in params):
        return None
    row_bytes = m[0].numel() * m.element_size()
    if m.numel() * m.element_size() <= 2 * _CHUNK_BYTES or row_bytes == 0:
        return None
    return max(1, _CHUNK_BYTES // row_bytes)


#: The spike orders of a train of ``k`` spikes in ``T`` steps: ``"late"`` (the paper's text) fires
#: the last ``k`` steps, ``"early"`` (the authors' code) the first ``k``; counts are the same.
SPIKE_ORDERS = ("late", "early")


def check_spike_order(order: str, name: str = "spike_order") -> None:
    """Raise ``ValueError`` (naming the argument ``name``) unless ``order`` is one of
    :data:`SPIKE_ORDERS`: the one check every entry point that takes an order calls."""
    if order not in SPIKE_ORDERS:
        raise ValueError(f"{name} must be 'late' or 'early', got {order!r}")


def spikes_from_count(
    k: torch.Tensor, T: int, spike_value: Scalar = 1.0, order: str = "late"
) -> torch.Tensor:
    """Turn counts ``k`` of shape ``[...]`` into sorted spike trains ``[T, ...]``.

    ``order="late"`` (the paper's text) fires at steps ``T-k+1 .. T`` (1-based), so every train
    reads 0...0 1...1; ``order="early"`` (the authors' code) fires at steps ``1 .. k``.
    Values are ``spike_value`` where a spike is fired and 0 elsewhere. Every step has ``k``'s
    memory layout (:func:`step_strides`).
    """
    check_spike_order(order, "order")
    late = order == "late"
    sv = torch.as_tensor(spike_value, dtype=k.dtype, device=k.device)
    out = _spikes_blocked(k, T, sv, late)
    if out is not None:
        return out
    steps = torch.arange(T, device=k.device, dtype=k.dtype).reshape((T,) + (1,) * k.dim())
    # The comparison writes 1.0/0.0 straight into the output, then one in-place multiply by the
    # spike value: the same values as torch.where(fired, sv, 0) (a NaN count never fires) in
    # about half the time on CPU, where writing the [T, ...] output dominates the node's cost.
    shape = torch.broadcast_shapes(steps.shape, k.shape)
    out = torch.empty_strided(shape, step_strides(k, T), dtype=k.dtype, device=k.device)
    if torch.broadcast_shapes(shape, sv.shape) != shape:
        bound = T - k if late else k
        (torch.ge if late else torch.lt)(steps, bound, out=out)
        return out * sv
    if late:
        torch.ge(steps, T - k, out=out)
    else:
        torch.lt(steps, k, out=out)
    return out.mul_(sv)


# Elements per block of the blocked CPU loops (here and in the reference time mean): one block's
# rows stay in the CPU cache across the T steps, instead of one pass over memory per step.
BLOCK = 1 << 17


def _spikes_blocked(k: torch.Tensor, T: int, spike_value: torch.Tensor, late: bool) -> Optional[torch.Tensor]:
    """:func:`spikes_from_count` for large dense CPU counts, block by block, or ``None``.

    The output ``[T, ...]`` is the node's largest memory traffic. Writing the 0/1 comparison for
    all steps and then multiplying by the spike value costs two passes over it; here both run on
    one cache-sized block of neurons at a time, so the output is written to memory once. Step
    ``t`` fires where ``k >= T - t`` (late) or ``k > t`` (early), the comparisons above with the
    sides swapped, exact for the integer (or NaN) counts; then the same multiply.
    """
    if (k.device.type != "cpu" or torch.compiler.is_compiling() or k.numel() <= BLOCK
            or torch.broadcast_shapes(k.shape, spike_value.shape) != k.shape):
        return None
    if k.stride() != step_strides(k, 1)[1:]:
        return None  # not dense: the broadcast form above
    sv = torch.empty_like(k).copy_(torch.broadcast_to(spike_value, k.shape))
    out = torch.empty_strided((T,) + tuple(k.shape), step_strides(k, T), dtype=k.dtype, device=k.device)
    n = k.numel()
    flat_k, flat_sv = k.as_strided((n,), (1,)), sv.as_strided((n,), (1,))
    flat_out = out.as_strided((T, n), (n, 1))
    for s in range(0, n, BLOCK):
        kb, svb = flat_k[s:s + BLOCK], flat_sv[s:s + BLOCK]
        for t in range(T):
            o = flat_out[t, s:s + BLOCK]
            if late:
                torch.ge(kb, T - t, out=o)
            else:
                torch.gt(kb, t, out=o)
            o.mul_(svb)
    return out


def divide_(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t /= n`` in place, correctly rounded on every device (the time mean's division).

    The divisor is a 0-d tensor on ``t``'s device, never a Python number: ATen's CUDA division
    by a CPU scalar (which a Python number becomes) multiplies by the rounded reciprocal
    ``1/n``, one ulp off the quotient for a third to a half of float32 values at ``n = 3`` or
    ``7``, while the native and cupy kernels divide.
    """
    return t.div_(torch.full((), n, dtype=t.dtype, device=t.device))


def step_strides(step: torch.Tensor, T: int) -> tuple:
    """Strides of a dense ``[T, *step.shape]`` tensor whose every step has ``step``'s memory layout.

    A channels-last step gives channels-last steps, so the next convolution keeps the fast layout;
    a step that is not dense gets the contiguous layout (``torch.empty_like``'s rule).
    """
    inner = torch.empty_like(step, device="meta").stride()
    return (step.numel(),) + tuple(inner)


def parallel_conversion_matrix(T: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Lambda_PC of paper Eq. 8: row ``x`` (1-based) is ``1/(T-x+1)`` repeated ``T`` times."""
    rows = 1.0 / (T - torch.arange(T, dtype=dtype, device=device))
    return rows[:, None].expand(T, T).clone()


def shift_vector(T: int, psi: Scalar, psi_da: Scalar = 0.0, dtype=torch.float64, device=None):
    """The shift ``b`` of Algorithm 1 Stage III, shape ``[T, *broadcast(psi, psi_da)]``.

    ``b[x] = psi/(T-x+1) + psi_da*T/(T-x+1)``; for ``psi_da = 0`` it is Theorem 4.1's
    ``[psi/T, ..., psi/(T-x+1), ..., psi]``.
    """
    denom = (T - torch.arange(T, dtype=dtype, device=device))
    psi_t = torch.as_tensor(psi, dtype=dtype, device=device)
    psi_da_t = torch.as_tensor(psi_da, dtype=dtype, device=device)
    extra = max(psi_t.dim(), psi_da_t.dim())
    denom = denom.reshape((T,) + (1,) * extra)
    return psi_t / denom + psi_da_t * T / denom


def matrix_form_spikes(
    current: torch.Tensor,
    theta_pre: Scalar,
    psi: Scalar,
    psi_da: Scalar = 0.0,
    channel_dim: int = 1,
) -> torch.Tensor:
    """Spikes by the paper's explicit form: ``s = (Lambda_PC @ I + b >= theta_pre)``, 0/1 valued.

    ``current`` is ``[T, N, ...]`` (the matrix form needs ``T_in == T``). Costs O(T^2) per
    neuron: for tests and teaching, not for inference.
    """
    T = current.shape[0]
    lam = parallel_conversion_matrix(T, dtype=current.dtype, device=current.device)
    flat = current.reshape(T, -1)
    charge = (lam @ flat).reshape(current.shape)
    nd = current.dim() - 1
    b = shift_vector(
        T,
        channel_view(_as(psi, current), nd, channel_dim),
        channel_view(_as(psi_da, current), nd, channel_dim),
        dtype=current.dtype,
        device=current.device,
    )
    if b.dim() == 1:
        b = b.reshape((T,) + (1,) * nd)
    th = channel_view(_as(theta_pre, current), nd, channel_dim)
    return (charge + b >= th).to(current.dtype)


def first_spike_time(
    mean_current: torch.Tensor,
    T: int,
    theta_pre: Scalar,
    psi: Scalar,
    psi_da: Scalar = 0.0,
) -> torch.Tensor:
    """First spike step (1-based) by binary search over the step form (paper 4.3), ``T+1`` if silent.

    Evaluates ``V[x] = T/(T-x+1)*m + b[x]`` at O(log T) steps per neuron, relying on the
    sorting property (once a neuron fires it fires to the end). Returns an int64 tensor.
    """
    m = mean_current
    lo = torch.ones(m.shape, dtype=torch.int64, device=m.device)
    hi = torch.full(m.shape, T + 1, dtype=torch.int64, device=m.device)  # T+1: never fires
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        active = lo < hi
        x = mid.clamp(max=T).to(m.dtype)
        denom = T - x + 1
        v = T / denom * m + psi / denom + psi_da * T / denom
        fires = (v >= theta_pre) & (mid <= T)
        hi = torch.where(active & fires, mid, hi)
        lo = torch.where(active & ~fires, mid + 1, lo)
    return lo


def _as(p: Scalar, like: torch.Tensor) -> Scalar:
    if isinstance(p, torch.Tensor):
        return p.to(dtype=like.dtype, device=like.device)
    return p
