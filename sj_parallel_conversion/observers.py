"""Modules that sit at activation sites during calibration and record statistics.

* :class:`MaxObserver` records the per-channel running maximum of a ReLU's output (the
  "historical maximum" of paper 4.2, first stage of training-free conversion).
* :class:`DACalibrator` runs Algorithm 1 at one site: on a batch that holds the reference stream
  and the calibrated stream side by side it measures the per-channel pre- and post-activation
  errors and updates the DA-QCFS parameters ``psi_da`` / ``phi_da`` by exponential averaging.

Both reduce their statistics through an optional ``reducer`` (sum over processes) so that a
distributed run ends with the same parameters on every rank.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn

from . import formulas
from .activation import DAQCFS, QCFS, ClipReLU

Reducer = Optional[Callable[[torch.Tensor, str], torch.Tensor]]

__all__ = ["MaxObserver", "DACalibrator", "SharedReference", "channel_mean"]


def _other_dims(x: torch.Tensor, channel_dim: int) -> List[int]:
    if x.dim() < 2:
        raise ValueError(f"activation tensors need a batch and a channel axis, got shape {tuple(x.shape)}")
    cd = channel_dim % x.dim()
    return [d for d in range(x.dim()) if d != cd]


def _channel_sums(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    # float64 sums of float32 values, cast a cache-sized slice of the batch at a time: casting
    # the whole activation at once (or moving the channel axis first) copies it through memory
    # at every site and batch, most of Algorithm 1's time beside the convolutions. Summing in
    # float32 first would be faster still but changes the calibrated parameters in their last bits.
    dims = _other_dims(x, channel_dim)
    if dims[0] != 0:
        return x.to(torch.float64).sum(dim=dims)
    rows = max(1, (1 << 17) // max(1, x[0].numel()))
    total = None
    for part in x.split(rows):
        s = part.to(torch.float64).sum(dim=dims)
        total = s if total is None else total + s
    return total


def channel_mean(x: torch.Tensor, channel_dim: int = 1, reducer: Reducer = None) -> torch.Tensor:
    """Per-channel mean over batch and spatial axes (the paper's mu), in float64 for stable sums."""
    count = torch.tensor([float(x.numel() // max(1, x.shape[channel_dim]))], dtype=torch.float64, device=x.device)
    total = torch.cat([_channel_sums(x, channel_dim), count])
    if reducer is not None:
        total = reducer(total, "sum")
    return total[:-1] / total[-1]


class MaxObserver(nn.Module):
    """Pass-through wrapper of a ReLU-family activation recording its per-channel output maximum."""

    def __init__(self, act: nn.Module, channel_dim: int = 1, reducer: Reducer = None):
        super().__init__()
        self.act = act
        self.channel_dim = channel_dim
        self.reducer = reducer
        self.register_buffer("max_val", torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(x)
        m = y.detach().amax(dim=_other_dims(y, self.channel_dim)).to(torch.float32)
        if self.reducer is not None:
            m = self.reducer(m, "max")
        self.max_val = m if self.max_val.numel() == 0 else torch.maximum(self.max_val, m)
        return y

    def to_clip_relu(self, eps: float = 1e-4, site: Optional[str] = None) -> ClipReLU:
        """ClipReLU with the recorded maxima; dead channels (max 0) get ``eps`` so theta stays positive.

        Raises ``ValueError`` naming the site when a recorded maximum is NaN (the network produced
        NaN activations on the calibration data, and the converted neurons, which do not check for
        NaN at run time by default, would silently stay silent there) or infinite.
        """
        if self.max_val.numel() == 0:
            raise RuntimeError("MaxObserver saw no data: the calibration loader yielded no batch")
        where = f" at activation site {site!r}" if site else ""
        if bool(torch.isnan(self.max_val).any()):
            raise ValueError(f"NaN activations{where} on the calibration data: check the model and the inputs")
        if bool(torch.isinf(self.max_val).any()):
            # A threshold must be finite: say where, rather than leave it to ClipReLU's check.
            raise ValueError(f"infinite activations{where} on the calibration data: check the model's weights "
                             "and the inputs")
        return ClipReLU(torch.clamp(self.max_val, min=eps), channel_dim=self.channel_dim)


class DACalibrator(nn.Module):
    """Algorithm 1 (Stage II) at one activation site.

    The input batch is ``cat([z_ref, z_cal])``: the first half comes from the reference network
    (original activations), the second from the calibrated one (DA-QCFS). For each batch::

        e_pre  = mu(z_ref - z_cal);            psi_da <- alpha*psi_da + (1-alpha)*e_pre
        e_post = mu(ref(z_ref) - da(z_cal));   phi_da <- alpha*phi_da + (1-alpha)*e_post

    where ``da`` already uses the updated ``psi_da``. With ``bias_correction`` the averages are
    divided by ``1 - alpha**n`` after ``n`` batches (as Adam does for its moments): an average
    started at 0 otherwise keeps only ``1 - alpha**n`` of the correction, about 10% after 10
    batches at alpha = 0.99. The output is ``cat([ref(z_ref), da(z_cal)])`` with the updated
    parameters, so deeper sites see the calibrated stream of this batch.

    ``method="moment"`` solves for the parameters instead of averaging updates. ``phi_da`` scales
    the spike value, so the output error it removes is ``phi * q`` with ``q = k/T``; the averaged
    update above settles where ``phi = e0 / (1 + mean(q))`` (``e0`` the mean error at ``phi = 0``)
    and leaves most of the error of sparse layers (small ``mean(q)``) in place. Moment matching
    sets ``phi = sum(e) / sum(q)`` over all calibration data seen (``e = ref(z_ref) - theta*q``),
    which makes the per-channel mean output error zero, and ``psi_da`` the plain mean of
    ``e_pre`` over all batches. ``theta + phi`` is kept at >= 10% of ``theta``.
    """

    def __init__(self, ref: nn.Module, da: DAQCFS, alpha: float = 0.99, bias_correction: bool = True,
                 reducer: Reducer = None, method: str = "ema", update: bool = True):
        super().__init__()
        self.update = bool(update)
        if not isinstance(ref, (QCFS, ClipReLU)):
            raise TypeError(f"reference activation must be QCFS or ClipReLU, got {type(ref).__name__}")
        if method not in ("ema", "moment"):
            raise ValueError(f"method must be 'ema' or 'moment', got {method!r}")
        self.method = method
        self.ref = ref
        self.da = da
        self.alpha = float(alpha)
        self.bias_correction = bool(bias_correction)
        self.reducer = reducer
        self.steps = 0
        self.register_buffer("psi_ema", torch.empty(0))
        self.register_buffer("phi_ema", torch.empty(0))

    def _average(self, ema: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        if ema.numel() == 0:
            ema = torch.zeros_like(err)
        return self.alpha * ema + (1 - self.alpha) * err

    def _debiased(self, ema: torch.Tensor) -> torch.Tensor:
        if self.bias_correction and self.alpha > 0:
            return ema / (1 - self.alpha ** self.steps)
        return ema

    def _moment(self, z_ref: torch.Tensor, z_cal: torch.Tensor, r_ref: torch.Tensor,
                out: Optional[torch.Tensor]) -> torch.Tensor:
        cd = self.da.channel_dim
        n = self.steps
        e_pre = channel_mean(z_ref - z_cal, cd, self.reducer)
        self.psi_ema = e_pre if self.psi_ema.numel() == 0 else self.psi_ema + (e_pre - self.psi_ema) / n
        self.da.psi_da = self.psi_ema.to(torch.float32)
        k = self.da.counts(z_cal)
        theta = formulas.channel_view(self.da.theta.to(z_cal.dtype), z_cal.dim(), cd)
        zero_phi = formulas.spike_value(k, theta, self.da.T)  # the output with phi_da = 0
        q = zero_phi / theta  # k/T
        e = r_ref - zero_phi
        stats = torch.stack([_channel_sums(e, cd), _channel_sums(q, cd)])
        if self.reducer is not None:
            stats = self.reducer(stats, "sum")
        self.phi_ema = stats if self.phi_ema.numel() == 0 else self.phi_ema + stats
        num, den = self.phi_ema
        phi = torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))
        # A fit on few spikes can drive theta + phi towards 0; keep the spike value at >= 10% of theta.
        floor = -0.9 * self.da.theta.to(phi.dtype).expand_as(phi)
        self.da.phi_da = torch.maximum(phi, floor).to(torch.float32)
        return self.da.value(k, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _streams(z, self.ref, [self])

    def stream(self, z_ref: torch.Tensor, z_cal: torch.Tensor, r_ref: torch.Tensor,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One batch of Algorithm 1: update the parameters from the reference stream's input
        ``z_ref`` and output ``r_ref = ref(z_ref)`` and the calibrated stream's input ``z_cal``;
        return the calibrated stream's output with the updated parameters (written into ``out``
        when given)."""
        if not self.update:
            # A site left out of calibration still carries its stream to the deeper sites.
            return out.copy_(self.da(z_cal)) if out is not None else self.da(z_cal)
        self.steps += 1
        if self.method == "moment":
            return self._moment(z_ref, z_cal, r_ref, out)
        cd = self.da.channel_dim
        # One buffer for both differences (the same operations), where no gradient is recorded
        # and the difference keeps the input's dtype.
        scratch = torch.empty_like(z_cal) if _writable(r_ref, z_cal) else None
        gap = z_ref - z_cal if scratch is None else torch.sub(z_ref, z_cal, out=scratch)
        self.psi_ema = self._average(self.psi_ema, channel_mean(gap, cd, self.reducer))
        self.da.psi_da = self._debiased(self.psi_ema).to(torch.float32)
        if self.da.phi_da.numel() == 1 and self.da.psi_da.numel() > 1:
            self.da.phi_da = self.da.phi_da.expand_as(self.da.psi_da).clone()
        # The counts are computed once: measured with the old phi_da, output with the new one.
        k = self.da.counts(z_cal)
        gap = (r_ref - self.da.value(k)) if scratch is None else torch.sub(r_ref, self.da.value(k, scratch), out=scratch)
        e_post = channel_mean(gap, cd, self.reducer)
        self.phi_ema = self._average(self.phi_ema, e_post)
        self.da.phi_da = self._debiased(self.phi_ema).to(torch.float32)
        return self.da.value(k, out)


class SharedReference(nn.Module):
    """Several :class:`DACalibrator` at one site that share one reference stream: the batch is
    ``cat([z_ref, z_1, ..., z_n])`` and the output ``cat([ref(z_ref), da_1(z_1), ..., da_n(z_n)])``,
    each ``da_i`` updated by its own calibrator. Calibrations that differ only in where they
    start (Algorithm 1 from the recorded maxima and from squared-error thresholds) then run
    the ANN's stream once instead of once each."""

    def __init__(self, calibrators: List[DACalibrator]):
        super().__init__()
        if not calibrators:
            raise ValueError("SharedReference needs at least one calibrator")
        self.calibrators = nn.ModuleList(calibrators)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _streams(z, self.calibrators[0].ref, list(self.calibrators))


def _writable(r_ref: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether Algorithm 1 may write into buffers of ``z``'s dtype: no gradient is being recorded
    and the reference output has that dtype (a float32 per-channel threshold promotes a
    half-precision input, and the old out-of-place arithmetic kept float32 then)."""
    return not torch.is_grad_enabled() and r_ref.dtype == z.dtype


def _streams(z: torch.Tensor, ref: nn.Module, calibrators: List[DACalibrator]) -> torch.Tensor:
    """``cat([ref(z_ref), c_1 stream, ..., c_n stream])`` for ``z = cat([z_ref, z_1, ..., z_n])``,
    each calibrated stream written straight into its part of the output."""
    n = len(calibrators) + 1
    if z.shape[0] % n:
        raise RuntimeError(f"the calibration batch must hold the reference stream and {n - 1} calibrated "
                           f"stream(s) of equal size; got {z.shape[0]} rows")
    z_ref, *z_cal = z.chunk(n, dim=0)
    r_ref = ref(z_ref)
    if not _writable(r_ref, z):
        return torch.cat([r_ref] + [c.stream(z_ref, zc, r_ref) for c, zc in zip(calibrators, z_cal)], dim=0)
    out = torch.empty_like(z)
    parts = out.chunk(n, dim=0)
    parts[0].copy_(r_ref)
    for c, zc, part in zip(calibrators, z_cal, parts[1:]):
        c.stream(z_ref, zc, r_ref, part)
    return out
