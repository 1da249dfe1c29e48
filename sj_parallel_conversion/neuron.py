"""The parallel conversion neuron (paper Eq. 8, Theorem 4.1, Algorithm 1 Stage III/IV)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from spikingjelly.activation_based import base
from spikingjelly.activation_based import neuron as sj_neuron

from . import formulas, kernels

ParamLike = Union[float, int, torch.Tensor]

__all__ = ["ParallelConversionNode", "check_parameter", "check_loaded_parameters"]

NAN_MESSAGE = ("{name} received NaN input currents (or +inf and -inf for the same neuron): "
               "their time mean, which sets the spike count, is undefined")


class ParallelConversionNode(sj_neuron.BaseNode):
    r"""A SpikingJelly neuron that computes all ``T`` time steps of a layer at once.

    For input currents ``I`` of shape ``[T_in, N, ...]`` (any ``T_in >= 1``) it computes the time
    mean ``m``, the spike count ``k = clip(floor(((m + psi_da) * T + psi) / v_threshold), 0, T)``
    and emits ``T`` steps in which the last ``k`` carry ``spike_value`` and the others 0 (the
    sorted, back-loaded trains of the paper). This is the paper's step form
    ``s[x] = (T/(T-x+1) m + b[x] >= theta_pre)`` in closed form: O(T) work per neuron.

    Args:
        T: output time steps.
        v_threshold: ``theta_pre``, a positive float or a 1-D per-channel tensor.
        spike_value: ``theta_post`` (value of a spike); defaults to ``v_threshold``.
        psi: the absolute shift, in the units of the threshold; defaults to ``v_threshold / 2``.
            (QCFS's and DA-QCFS's ``shift`` is the same shift as a fraction of their threshold.)
        psi_da: the DA-QCFS input shift, in the units of the input; default 0.
        channel_dim: axis of the per-step tensor ``[N, C, ...]`` that per-channel tensors index.
        backend: ``"auto"`` (the fused kernel of the input's device when it can run: native C++
            for float32/float64 CPU tensors, cupy for CUDA ones; else torch), ``"torch"``,
            ``"native"`` or ``"cupy"``.
        spike_order: ``"late"`` (the paper's text, default) or ``"early"`` (the authors' code);
            counts are identical.
        check_nan: raise ``ValueError`` when a neuron's time-mean current is NaN (a NaN input, or
            ``+inf`` and ``-inf`` in one train). Off by default: the check reads a flag back to
            the host at every call (a synchronisation; under ``torch.compile`` it happens inside
            the operator, so the graph stays whole).
            Unchecked, a NaN neuron emits no spike. ``+inf`` / ``-inf`` alone saturate to ``T``
            spikes / no spike.
        inplace: write the spikes over the input currents (the returned tensor is then the
            input), as ``nn.ReLU(inplace=True)`` does, where that saves work: the input has ``T``
            steps in one dense layout, runs on the native CPU kernel and needs no gradient (nor do
            the parameters). Elsewhere (CUDA, half precision, other layouts) the output is a new
            tensor, since those backends would compute one and copy it back. Converters set it
            where the graph shows the neuron is the only reader of its input
            (:mod:`~sj_parallel_conversion.reuse`). Off under ``torch.compile``, which plans
            memory itself.
        step_mode: only ``"m"``.

    The spikes come from the custom operator ``sj_parallel_conversion::fire`` (CPU: the fused
    native kernel, CUDA: the fused cupy kernel), which has a fake implementation, so ``torch.compile(net,
    fullgraph=True)`` traces converted networks in one graph. Only multi-step mode is supported: a
    single step carries no information about the other ``T - 1``. For ``[N, ...]`` input use
    :func:`sj_parallel_conversion.count_domain_model` (or :func:`~sj_parallel_conversion.count_inference`).
    A converted network checks every module before ``functional.set_step_mode`` switches any
    (:class:`~sj_parallel_conversion.network.ConvertedNetwork`), so refusing ``"s"`` leaves it as
    it was.

    **As a SpikingJelly neuron.** The node is a :class:`spikingjelly.activation_based.neuron.BaseNode`,
    so ``monitor.OutputMonitor(net, neuron.BaseNode)``, ``functional.reset_net`` /
    ``detach_net``, SpikingJelly's op counters and other code looking for ``BaseNode`` find it;
    ``v_threshold`` is its threshold ``theta_pre`` (a buffer: a 0-d or per-channel tensor, not a
    float). BaseNode's other settings are fixed, because the closed form has no place for them,
    and are not constructor arguments:

    * ``v_reset`` is ``None``: the closed form is the neuron that resets by subtracting the
      threshold (soft reset); there is no hard-reset variant.
    * ``surrogate_function`` is ``None`` and ``detach_reset`` is ``False``: the node is
      inference-only (its backward raises), so no surrogate gradient or detached reset applies.
    * ``store_v_seq`` is ``False`` and setting it to ``True`` raises: the sorted trains are not the
      trains of a step-by-step neuron, so no per-step potential belongs to them.

    **Membrane potential** ``v``. After a forward with ``store_v = True`` (an attribute, off by
    default), ``v`` holds, per neuron (shape ``[N, ...]``, the input's dtype), the residual
    membrane potential after the ``T`` output steps::

        v = (m + psi_da) * T + psi - k * v_threshold

    with ``m`` the time mean of the input and ``k`` the spike count: the potential an
    integrate-and-fire neuron with soft reset, threshold ``v_threshold`` and initial potential
    ``psi`` holds after ``T`` steps of the constant current ``m + psi_da``. For
    ``0 <= psi < v_threshold`` that IF neuron fires exactly ``k`` times (the parallel neuron
    emits the same count, sorted), and ``0 <= v < v_threshold`` wherever
    ``0 <= m + psi_da <= v_threshold``; saturated neurons (``k = T``) keep ``v >= v_threshold``
    and silent ones may hold ``v < 0``. With ``store_v = False`` ``v`` is ``None``: computing it
    takes another pass over the input currents, which inference does not need, so a monitor such
    as ``monitor.AttributeMonitor("v", False, net, neuron.BaseNode)`` records ``None`` until it
    is switched on. ``functional.reset_net`` sets ``v`` back to ``None``. Nothing carries over
    between calls: every call is a complete ``T``-step window, whatever ``v`` holds.
    ``store_v`` is a run-time setting, not part of the model: :func:`~sj_parallel_conversion.save_snn`
    does not save it.
    """

    def __init__(
        self,
        T: int,
        v_threshold: ParamLike = 1.0,
        spike_value: Optional[ParamLike] = None,
        psi: Optional[ParamLike] = None,
        psi_da: ParamLike = 0.0,
        channel_dim: int = 1,
        backend: str = "auto",
        spike_order: str = "late",
        check_nan: bool = False,
        inplace: bool = False,
        step_mode: str = "m",
    ) -> None:
        # BaseNode insists on a float threshold; the real one (a tensor buffer) replaces it below.
        # v_reset=None registers v with a float reset value; v here is None until stored.
        super().__init__(v_threshold=1.0, v_reset=None, surrogate_function=None, detach_reset=False,
                         step_mode="m", store_v_seq=False)
        del self.v_threshold
        self.set_reset_value("v", None)
        self.v = None
        self.store_v = False
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        kernels.check_backend(backend)
        formulas.check_spike_order(spike_order)
        if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
            raise ValueError(f"channel_dim must be an int, got {channel_dim!r}")
        self.T = T
        self.channel_dim = channel_dim
        self.backend = backend
        self.spike_order = spike_order
        self.check_nan = check_nan
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be a bool, got {inplace!r}")
        self.inplace = inplace
        theta = _param("v_threshold", v_threshold, positive=True)
        sv = theta.clone() if spike_value is None else _param("spike_value", spike_value, positive=True)
        psi = theta / 2 if psi is None else _param("psi", psi)
        psi_da = _param("psi_da", psi_da)
        sizes = {n: p.numel() for n, p in
                 (("v_threshold", theta), ("spike_value", sv), ("psi", psi), ("psi_da", psi_da))
                 if p.dim() == 1}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"per-channel parameters disagree on the channel count: {sizes}")
        self.register_buffer("v_threshold", theta)
        self.register_buffer("spike_value", sv)
        self.register_buffer("psi", psi)
        self.register_buffer("psi_da", psi_da)
        self.step_mode = step_mode

    # -- SpikingJelly step-mode protocol -------------------------------------------------------
    def supported_step_mode(self):
        return ("m",)

    def step_mode_refusal(self, value: str) -> str:
        """Why this node cannot take step mode ``value`` (the message its setter raises)."""
        # One step carries no information about the other T - 1, so there is no single-step form;
        # say where [N, ...] input goes instead of SpikingJelly's generic message.
        return (f"{self._get_name()} computes all T={self.T} steps at once and supports only "
                f"step_mode 'm', got {value!r}: feed [T, N, ...] input, or evaluate [N, ...] input "
                "with sj_parallel_conversion.count_domain_model(net) or count_inference(net, x)")

    def _set_step_mode(self, value: str) -> None:
        if value != "m":
            raise ValueError(self.step_mode_refusal(value))
        base.StepModule.step_mode.fset(self, value)

    step_mode = property(base.StepModule.step_mode.fget, _set_step_mode,
                         doc="Always ``'m'``: setting another mode raises ``ValueError``.")

    # BaseNode's per-step potential record: refused, not silently left empty (see the class doc).
    def _get_store_v_seq(self) -> bool:
        return False

    def _set_store_v_seq(self, value: bool) -> None:
        if value:
            raise ValueError(f"{self._get_name()} has no per-step membrane potential: its spike trains are sorted "
                             "(all T steps at once), not the trains of a step-by-step neuron; set store_v=True "
                             "for the residual potential after the T steps")
        self.v_seq = None

    store_v_seq = property(_get_store_v_seq, _set_store_v_seq,
                           doc="Always ``False``: setting ``True`` raises ``ValueError`` (see the class doc).")

    @property
    def store_v(self) -> bool:
        """Whether a forward stores the residual membrane potential in ``v`` (see the class doc)."""
        return self._store_v

    @store_v.setter
    def store_v(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"store_v must be a bool, got {value!r}")
        self._store_v = value

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        self._check_input(x_seq, time_axis=True)
        args = (x_seq, self.T, self.v_threshold, self.psi, self.psi_da, self.spike_value)
        inplace = (self.inplace and x_seq.shape[0] == self.T and not torch.compiler.is_compiling()
                   and not formulas.needs_grad(x_seq, *args[2:])
                   and kernels.overwrites_in_one_pass(self.backend, x_seq))
        kwargs = dict(channel_dim=self.channel_dim, order=self.spike_order, backend=self.backend, inplace=inplace)
        if not self.check_nan:
            # The default path: one operator call, no host synchronisation (compile-friendly).
            return kernels.fire(*args, **kwargs)
        try:
            return kernels.fire(*args, **kwargs, check_nan=True)
        except kernels.NaNMeanError:
            raise ValueError(NAN_MESSAGE.format(name=self._get_name())) from None

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        if not self.store_v:
            return super().forward(x_seq)
        (spikes,), (self.v,) = self.multi_step_functional_forward((x_seq,), (self.v,))
        return spikes

    # -- SpikingJelly's explicit-state protocol (base.to_functional_forward) ---------------------
    def materialize_states(self, inputs, states, step_mode):
        # v is an output of the call, never an input to it: no state to shape like the input.
        return states

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        """``((spikes,), (v,))`` for ``inputs = (x_seq,)``, leaving the node's own ``v`` alone.

        ``v`` is the residual potential when :attr:`store_v` is set, else ``states[0]`` unchanged.
        """
        (x_seq,) = inputs
        # Before firing: an in-place node overwrites x_seq with the spikes.
        v = self.residual_potential(x_seq) if self.store_v else states[0]
        return (self.multi_step_forward(x_seq),), (v,)

    def single_step_functional_forward(self, inputs, states, **kwargs):
        raise ValueError(self.step_mode_refusal("s"))

    def residual_potential(self, x_seq: torch.Tensor) -> torch.Tensor:
        """The membrane potential ``v`` after the ``T`` steps for input currents ``[T_in, N, ...]``
        (see the class doc): ``[N, ...]`` in ``x_seq``'s dtype."""
        self._check_input(x_seq, time_axis=True)
        # The reference time mean (accumulation dtype) and count, which every implementation of
        # the operator matches bit for bit: k is the count the node emits for this input.
        m = kernels.time_mean(x_seq)
        k = kernels.count(m, self.T, self.v_threshold, self.psi, self.psi_da, channel_dim=self.channel_dim)
        theta, psi, psi_da = (formulas.channel_view(p.to(m.dtype), m.dim(), self.channel_dim)
                              for p in (self.v_threshold, self.psi, self.psi_da))
        v = (m + psi_da) * self.T + psi - k * theta
        return v.to(x_seq.dtype)

    # -- the same neuron in the count domain ---------------------------------------------------
    def count(self, mean_current: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Spike counts ``k`` (integer-valued, input dtype) for time-mean currents ``[N, ...]``.

        ``inplace=True`` lets ``k`` overwrite ``mean_current`` (see :func:`.formulas.spike_count`).
        """
        return kernels.inference_only(self._count(mean_current, inplace, scale=None))

    def rate(self, mean_current: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Time mean of the output, ``(spike_value / T) * k``, for time-mean currents ``[N, ...]``.

        ``inplace=True`` lets the result overwrite ``mean_current``.
        """
        # (spike_value / T) * k, in this order: the same operations as QCFS's theta / L * q and
        # DA-QCFS's (theta + phi_da) / T * k, so a lossless conversion (T == L) reproduces the
        # ANN's activations bit for bit.
        step = self.spike_value.to(mean_current.dtype) / self.T
        if formulas.needs_grad(mean_current, step):
            # Autograd records it; backward raises, as at spike level (docs/limits.rst).
            return kernels.inference_only(
                formulas.channel_view(step, mean_current.dim(), self.channel_dim) * self._count(mean_current, False, None))
        # Inference: the multiply joins the count's pass over memory.
        return self._count(mean_current, inplace, scale=step)

    def _count(self, mean_current: torch.Tensor, inplace: bool, scale: Optional[torch.Tensor]) -> torch.Tensor:
        self._check_input(mean_current, time_axis=False)
        out = kernels.count(mean_current, self.T, self.v_threshold, self.psi, self.psi_da, scale=scale,
                            channel_dim=self.channel_dim, backend=self.backend, inplace=inplace)
        # The result is NaN exactly where the input is NaN (k lies in [0, T], scale is finite and
        # positive), so a NaN sum is a cheaper test than a separate pass over the input.
        if self.check_nan and bool(torch.isnan(out.sum())):
            raise ValueError(NAN_MESSAGE.format(name=self._get_name()))
        return out

    # -- checks ----------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, time_axis: bool) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"{self._get_name()} expects a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self._get_name()} expects a floating-point tensor, got {x.dtype}")
        min_rank = 2 if time_axis else 1
        if x.dim() < min_rank:
            shape = "[T_in, N, ...]" if time_axis else "[N, ...]"
            raise ValueError(f"{self._get_name()} expects input of shape {shape}, got {tuple(x.shape)}")
        formulas.check_channels(x.shape[1:] if time_axis else x.shape, self.channel_dim,
                                [p.numel() for p in (self.v_threshold, self.spike_value, self.psi, self.psi_da)],
                                self._get_name())

    #: What :func:`check_parameter` requires of each parameter (``True``: positive as well as finite).
    PARAMETER_RULES = {"v_threshold": True, "spike_value": True, "psi": False, "psi_da": False}
    #: State names of earlier versions (``shift``, ``bias``): states and files saved then still load.
    RENAMED_STATE = {"shift": "psi", "bias": "psi_da"}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        for old, new in self.RENAMED_STATE.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        # A loaded node must be one the constructor would build: the same checks on the values.
        if not check_loaded_parameters(self, state_dict, prefix, self.PARAMETER_RULES, error_msgs):
            return
        # A calibrated node holds per-channel tensors where a freshly built one may hold scalars:
        # adopt the saved shapes so a converted model can be rebuilt and then loaded.
        for name in ("v_threshold", "spike_value", "psi", "psi_da"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                if saved.dim() > 1:
                    error_msgs.append(f"{prefix}{name}: expected a scalar or 1-D tensor, got shape {tuple(saved.shape)}")
                    continue
                # The node's dtype and device, as load_state_dict keeps them for every other tensor
                # (a network cast with .double() stays float64 throughout).
                current = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        except ValueError as exc:  # from set_extra_state: report it with the node's name, as torch does
            error_msgs.append(f"{prefix}_extra_state: {exc}")

    # T, spike order and channel axis are part of what a state means: thresholds calibrated for
    # T=8 silently change predictions at T=4, so they travel with the state and must match. One
    # int64 tensor [T, order, channel_dim] keeps every state_dict entry a tensor (tools that map
    # over state dicts, torch.equal comparisons) while load_state_dict still checks it.
    _ORDERS = formulas.SPIKE_ORDERS

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self.T, self._ORDERS.index(self.spike_order), self.channel_dim], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        if not (torch.is_tensor(state) and state.shape == (3,) and not state.is_floating_point()):
            raise ValueError(f"expected an int64 tensor [T, spike order, channel_dim], got {state!r:.80}")
        T, order, channel_dim = (int(v) for v in state.tolist())
        saved = {"T": T, "spike_order": self._ORDERS[order] if 0 <= order < 2 else f"<code {order}>",
                 "channel_dim": channel_dim}
        for name, value in saved.items():
            if value != getattr(self, name):
                raise ValueError(f"the state was saved with {name}={value!r} but this {self._get_name()} has "
                                 f"{name}={getattr(self, name)!r}; build it with {name}={value!r} to load this state")

    def extra_repr(self) -> str:
        def show(p: torch.Tensor) -> str:
            return f"{p.item():.4g}" if p.numel() == 1 else f"[{p.numel()} channels]"
        return (f"T={self.T}, v_threshold={show(self.v_threshold)}, spike_value={show(self.spike_value)}, "
                f"psi={show(self.psi)}, psi_da={show(self.psi_da)}, backend={self.backend}, "
                f"step_mode={self.step_mode}" + (", inplace=True" if self.inplace else ""))


def _param(name: str, value: ParamLike, positive: bool = False) -> torch.Tensor:
    """Validate a threshold-like argument and return it as a float32 0-d or 1-D tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a 1-D tensor, got bool")
    if isinstance(value, (int, float)):
        t = torch.tensor(float(value), dtype=torch.float32)
    elif isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D per-channel tensor, got shape {tuple(value.shape)}")
        if value.dim() == 1 and value.numel() == 0:
            raise ValueError(f"{name} must not be empty")
        t = value.detach().clone()
        t = t.to(torch.float32) if not t.is_floating_point() else t
    else:
        raise TypeError(f"{name} must be a float or a 1-D tensor, got {type(value).__name__}")
    check_parameter(name, t, positive)
    return t


def check_parameter(name: str, value: torch.Tensor, positive: bool = False) -> None:
    """The rule every threshold-like tensor obeys, at construction and at loading: finite values,
    and positive ones where ``positive`` (thresholds, spike values). Raises ``ValueError`` naming
    ``name`` and the first offending value (and its channel, for per-channel tensors)."""
    t = value.detach()
    finite = torch.isfinite(t)
    bad = ~finite if not bool(finite.all()) else (t <= 0 if positive else None)
    if bad is None or not bool(bad.any()):
        return
    flat = t.reshape(-1)
    i = int(bad.reshape(-1).nonzero()[0])
    at = f" (channel {i} of {flat.numel()})" if t.dim() == 1 and flat.numel() > 1 else ""
    rule = "finite" if not bool(finite.all()) else "positive"
    raise ValueError(f"{name} must be {rule}, got {flat[i].item()!r}{at}")


def check_loaded_parameters(module: torch.nn.Module, state_dict, prefix: str, rules, error_msgs) -> bool:
    """:func:`check_parameter` for the entries of a state being loaded into ``module`` (from its
    ``_load_from_state_dict``): ``rules`` maps each name to ``positive``. A failure is added to
    ``error_msgs`` naming the module's path and type, so ``load_state_dict`` refuses the state;
    returns whether all passed (the caller then leaves its own tensors as they were)."""
    ok = True
    for name, positive in rules.items():
        saved = state_dict.get(prefix + name)
        if torch.is_tensor(saved):
            try:
                check_parameter(name, saved, positive)
            except ValueError as exc:
                error_msgs.append(f"module {prefix[:-1] or '<root>'!r} ({module._get_name()}): {exc}")
                ok = False
    return ok
