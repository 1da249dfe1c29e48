"""ANN-side activations: QCFS (trainable), ClipReLU (recorded maxima) and DA-QCFS (calibrated).

They form the paper's chain ``ReLU -> ClipReLU -> DA-QCFS -> parallel neuron`` and
``QCFS -> DA-QCFS -> parallel neuron``: :meth:`to_daqcfs` moves one stage on, and
:meth:`DAQCFS.to_node` builds the equivalent :class:`~sj_parallel_conversion.ParallelConversionNode`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch import fx

from . import formulas
from .neuron import ParallelConversionNode, _param, check_loaded_parameters

ParamLike = Union[float, int, torch.Tensor]

__all__ = ["QCFS", "ClipReLU", "DAQCFS", "activation_call"]


def activation_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply one of this package's activations (``QCFS``, ``ClipReLU``, ``DAQCFS``) to ``x``.

    Their ``forward`` goes through this function, which is registered with :func:`torch.fx.wrap`:
    every FX tracer, SpikingJelly's plain one included, records it as a single ``call_function``
    node taking the module (a ``get_attr`` node) and the input, instead of tracing into the
    Python shape checks. :func:`~sj_parallel_conversion.tracing.activation_calls_to_modules` turns
    those nodes back into ``call_module`` nodes.
    """
    return module.activate(x)


# Registered by name so that tracing patches the global the forwards below look up.
fx.wrap("activation_call")


def _check_level(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_channels(module: nn.Module, x: torch.Tensor, params) -> None:
    formulas.check_channels(x.shape, module.channel_dim, [p.numel() for p in params], module._get_name())


class _CheckedState(nn.Module):
    """Loading a state checks its values as the constructor checks its arguments
    (:func:`~sj_parallel_conversion.neuron.check_parameter`, rules in ``PARAMETER_RULES``), so a
    loaded activation is always one the constructor would build."""

    PARAMETER_RULES: dict = {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if check_loaded_parameters(self, state_dict, prefix, self.PARAMETER_RULES, error_msgs):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)


class QCFS(_CheckedState):
    """Quantization-clip-floor-shift activation with a learnable threshold (paper Eq. 5).

    ``qcfs(x) = theta/L * clip(floor((x*L + shift*theta)/theta), 0, L)``; ``shift`` is a fraction
    of ``theta`` (0.5 gives the paper's ``psi = theta/2``). ``theta`` is a scalar or a 1-D
    per-channel :class:`~torch.nn.Parameter`; the floor has a straight-through gradient where
    autograd records the call. Elsewhere (``torch.no_grad``, and forward-mode AD, whose tangent is
    then the floor's own, 0) it is the plain floor: the same values, except that an input whose
    scaled value is infinite saturates at the top level or 0 instead of giving NaN.
    """

    PARAMETER_RULES = {"theta": True}

    def __init__(self, L: int = 8, theta: ParamLike = 8.0, shift: float = 0.5, channel_dim: int = 1):
        super().__init__()
        self.L = _check_level("L", L)
        self.shift = float(shift)
        self.channel_dim = channel_dim
        self.theta = nn.Parameter(_param("theta", theta, positive=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_call(self, x)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The activation itself (``forward`` routes through :func:`activation_call`)."""
        _check_channels(self, x, [self.theta])
        th = formulas.channel_view(self.theta, x.dim(), self.channel_dim)
        if formulas.needs_grad(x, th):
            return formulas.qcfs(x, th, self.L, self.shift * th, ste=True)
        # Without gradients the straight-through floor only costs passes over memory, and gives NaN
        # where the input or its scaled value is infinite; the plain floor saturates there, as the
        # converted neuron does, and gives the same value everywhere else.
        if th.dtype != x.dtype:
            # Mixed precision (a float32 theta under bfloat16 autocast): the count's last product
            # takes its operands in the other order, which rounds differently for a 0-d theta.
            return formulas.qcfs(x, th, self.L, self.shift * th)
        # The neuron's own count: the same operations, one cache-sized slice at a time.
        return formulas.spike_count(x, self.L, th, self.shift * th, scale=th / self.L)

    def to_daqcfs(self, T: int) -> "DAQCFS":
        """The uncalibrated DA-QCFS at ``T`` levels (psi_da = phi_da = 0) with this threshold."""
        return DAQCFS(T, self.theta.detach().clone(), shift=self.shift, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        th = f"{self.theta.item():.4g}" if self.theta.numel() == 1 else f"[{self.theta.numel()} channels]"
        return f"L={self.L}, theta={th}, shift={self.shift}"


class ClipReLU(_CheckedState):
    """``min(max(x, 0), theta)`` with a fixed scalar or per-channel ``theta`` (a buffer)."""

    PARAMETER_RULES = {"theta": True}

    def __init__(self, theta: ParamLike, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("theta", _param("theta", theta, positive=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_call(self, x)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The activation itself (``forward`` routes through :func:`activation_call`)."""
        _check_channels(self, x, [self.theta])
        return formulas.clip_relu(x, formulas.channel_view(self.theta.to(x.dtype), x.dim(), self.channel_dim))

    def to_daqcfs(self, T: int) -> "DAQCFS":
        """The uncalibrated DA-QCFS at ``T`` levels with ``theta`` = the recorded maxima."""
        return DAQCFS(T, self.theta.clone(), channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        th = f"{self.theta.item():.4g}" if self.theta.numel() == 1 else f"[{self.theta.numel()} channels]"
        return f"theta={th}"


class DAQCFS(_CheckedState):
    """Distribution-aware QCFS (paper Eq. 9) at ``T`` levels.

    ``da(x) = (theta + phi_da)/T * clip(floor(((x + psi_da)*T + shift*theta)/theta), 0, T)``.
    ``psi_da`` and ``phi_da`` are buffers set by calibration (Algorithm 1); ``theta`` is a scalar
    (QCFS source) or per-channel (ReLU source).
    """

    PARAMETER_RULES = {"theta": True, "psi_da": False, "phi_da": False}

    def __init__(
        self,
        T: int,
        theta: ParamLike,
        psi_da: ParamLike = 0.0,
        phi_da: ParamLike = 0.0,
        shift: float = 0.5,
        channel_dim: int = 1,
    ):
        super().__init__()
        self.T = _check_level("T", T)
        self.shift = float(shift)
        self.channel_dim = channel_dim
        self.register_buffer("theta", _param("theta", theta, positive=True))
        self.register_buffer("psi_da", _param("psi_da", psi_da))
        self.register_buffer("phi_da", _param("phi_da", phi_da))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_call(self, x)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The activation itself (``forward`` routes through :func:`activation_call`):
        :func:`~sj_parallel_conversion.formulas.da_qcfs`, as the value of its spike counts."""
        return self.value(self.counts(x))

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """The spike counts ``k`` behind :meth:`activate`: ``activate(x) == value(k)`` with the
        current ``phi_da`` (Algorithm 1 measures with one ``phi_da`` and outputs with the next,
        from one computation of ``k``)."""
        params = (self.theta, self.psi_da, self.phi_da)
        _check_channels(self, x, params)
        th, pda = (formulas.channel_view(p.to(x.dtype), x.dim(), self.channel_dim) for p in params[:2])
        return formulas.spike_count(x, self.T, th, self.shift * th, pda)

    def value(self, k: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output for spike counts ``k`` (:meth:`counts`), ``(theta + phi_da)/T * k``
        (written into ``out`` when given)."""
        th, fda = (formulas.channel_view(p.to(k.dtype), k.dim(), self.channel_dim) for p in (self.theta, self.phi_da))
        return formulas.spike_value(k, th, self.T, fda, out=out)

    def to_node(self, **node_kwargs) -> ParallelConversionNode:
        """The parallel neuron with the same firing rate (theta_pre = theta, theta_post = theta + phi_da)."""
        theta_post = self.theta + self.phi_da
        if not bool((theta_post > 0).all()):
            raise ValueError(
                "DA-QCFS calibration produced a non-positive theta + phi_da; the layer would emit "
                "negative or zero spikes. Use more calibration data or a smaller alpha.")
        return ParallelConversionNode(
            self.T, v_threshold=self.theta.clone(), spike_value=theta_post, psi=self.shift * self.theta,
            psi_da=self.psi_da.clone(), channel_dim=self.channel_dim, **node_kwargs)

    def extra_repr(self) -> str:
        n = max(self.theta.numel(), self.psi_da.numel())
        return f"T={self.T}, channels={n}, shift={self.shift}"
