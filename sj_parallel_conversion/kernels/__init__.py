"""The parallel conversion neuron as a ``torch.library`` operator, and the choice of its implementation.

The neuron is the operator ``sj_parallel_conversion::fire`` (as SpikingJelly 2.0 registers its own
neurons); ``sj_parallel_conversion::fire_`` writes the same spikes over its input (``T_in == T``),
which a converted network uses where it alone reads the currents (:mod:`sj_parallel_conversion.reuse`),
and ``fire_checked`` / ``fire_checked_`` are the same, raising :class:`NaNMeanError` where a
neuron's time mean is NaN. Their schemas hold tensors and the neuron's shape only. The dispatcher
picks the implementation registered for the input's device (CPU or CUDA), and within a device one
setting decides:

* ``"auto"`` (the default): the fused kernel of the device, the native C++ kernel
  (:mod:`.native_backend`) for float32/float64 CPU tensors and the cupy kernel
  (:mod:`.cupy_backend`) for CUDA ones, where it can run; elsewhere the reference torch operations
  (:mod:`.torch_backend`), with a one-time warning saying why a kernel could not be had;
* ``"torch"``: the reference operations on every device;
* ``"native"`` / ``"cupy"``: that kernel, raising where it cannot run (another device or dtype,
  no compiler, no cupy).

:func:`set_backend` sets it for the process and :func:`use_backend` for a block of code in the
current thread; a node's ``backend=`` argument other than ``"auto"`` runs the node's calls under
:func:`use_backend`. Every implementation gives the same bits (the tests hold the fused kernels to
the reference), so the choice changes speed, never results. With the learned fit's forward
(:mod:`sj_parallel_conversion.learned`, which counts with the reference's
:func:`~sj_parallel_conversion.formulas.spike_count`) these are the four implementations of the
neuron.

A fake implementation gives the output's shape, dtype and strides, so ``torch.compile(...,
fullgraph=True)`` traces a converted network without a graph break; in a compiled graph the
setting is read when the graph runs (a node's own ``backend`` is checked against the input's
device and dtype when traced, and :func:`use_backend` around the compiled call chooses). The
operator's backward raises: the node is an inference operator and silently returning zero
gradients through ``floor`` would be wrong. :func:`count` is the count domain's quantiser: one pass
of the native kernel on AVX2 CPUs, the reference operations elsewhere, the same bits either way.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator, Optional

import torch

from .. import formulas
from . import cupy_backend, native_backend, torch_backend
from .torch_backend import time_mean

__all__ = ["BACKENDS", "INFERENCE_ONLY", "inference_only", "check_backend", "set_backend", "get_backend", "use_backend", "resolve_backend", "fire",
           "count", "time_mean", "check_steps", "overwrites_in_one_pass", "fire_op", "fire_inplace_op",
           "fire_checked_op", "fire_checked_inplace_op", "NaNMeanError"]

BACKENDS = ("auto", "torch", "native", "cupy")
OP_NAME = "sj_parallel_conversion::fire"

#: The fused implementation of each device type the operator is registered for.
FUSED = {"cpu": "native", "cuda": "cupy"}


class NaNMeanError(ValueError, ArithmeticError):
    """A neuron's time-mean input is NaN (raised by :func:`fire` when asked to check). A
    ``ValueError``, as the node's own error is, so that a compiled graph (which raises this one)
    and an eager node can be caught alike."""


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else ``ValueError``: the one check of a
    backend name (nodes, the recipe and the dispatch all call it)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


_process_backend = "auto"
_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "sj_parallel_conversion_backend", default=None)


def set_backend(backend: str) -> None:
    """Choose the implementation for the whole process (see the module docstring); ``"auto"``
    restores the default. A :func:`use_backend` block still overrides it in its thread."""
    global _process_backend
    _process_backend = check_backend(backend)


def get_backend() -> str:
    """The setting in force here: the innermost :func:`use_backend`, else :func:`set_backend`'s."""
    scoped = _scoped_backend.get()
    return _process_backend if scoped is None else scoped


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the block under ``backend`` in the current thread (and context), then restore the
    previous setting."""
    token = _scoped_backend.set(check_backend(backend))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


_warned: set = set()


def _fallback(kind: str, reason: str) -> str:
    if kind not in _warned:
        warnings.warn(f"backend='auto': {reason}; using the torch backend (choose it with backend='torch' or "
                      "sj_parallel_conversion.kernels.set_backend('torch') to silence this warning)",
                      RuntimeWarning, stacklevel=4)
        _warned.add(kind)
    return "torch"


def _check_runs_on(backend: str, x: torch.Tensor) -> None:
    """Refuse a fused kernel named for a device or dtype it does not serve (static checks only:
    they also run while ``torch.compile`` traces)."""
    if backend == "cupy" and x.device.type != "cuda":
        raise ValueError(f"backend='cupy' needs a CUDA tensor, got one on {x.device}; "
                         "use backend='torch' or 'auto' for CPU tensors")
    if backend == "native":
        if x.device.type != "cpu":
            raise ValueError(f"backend='native' needs a CPU tensor, got one on {x.device}; use backend='cupy', "
                             "'torch' or 'auto' there")
        if x.dtype not in native_backend.DTYPES:
            raise TypeError(f"backend='native' supports {[str(d) for d in native_backend.DTYPES]}, got {x.dtype}; "
                            "use backend='torch' or 'auto'")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The implementation (``"torch"``, ``"native"`` or ``"cupy"``) that runs on ``x`` under the
    setting ``backend``, or raise why that setting cannot run there."""
    check_backend(backend)
    if backend == "torch":
        return "torch"
    _check_runs_on(backend, x)
    fused = FUSED.get(x.device.type)
    if fused == "native" and x.dtype not in native_backend.DTYPES:
        fused = None  # float16/bfloat16 on CPU: the torch operations are the implementation
    if fused is None:
        return "torch"
    reason = (native_backend if fused == "native" else cupy_backend).availability()
    if reason is None:
        return fused
    if backend != "auto":
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    if fused == "native":
        reason = f"the native CPU kernel cannot be built ({reason})"
    return _fallback(fused, reason)


_IMPL = {"torch": torch_backend.fire, "native": native_backend.fire, "cupy": cupy_backend.fire}


def check_steps(T: int, x_seq: Optional[torch.Tensor] = None) -> None:
    """Raise ``ValueError`` unless ``T`` is an integer >= 1 and ``x_seq`` (when given) has at
    least one time step along its leading axis.

    Every entry point calls this before dispatching: the implementations index the first input
    step, and the cupy kernel given ``T_in == 0`` would read a zero-size allocation, an illegal
    address that leaves the CUDA context unusable for the rest of the process.
    """
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T (output time steps) must be an integer >= 1, got {T!r}")
    if x_seq is None:
        return
    if not torch.is_tensor(x_seq) or x_seq.dim() < 1:
        raise ValueError(f"x_seq must be a tensor [T_in, N, ...], got {getattr(x_seq, 'shape', type(x_seq))}")
    if x_seq.shape[0] < 1:
        raise ValueError(f"x_seq has no time steps (shape {tuple(x_seq.shape)}): the neuron reads the time mean of "
                         "its T_in input steps, so T_in must be >= 1")


# The operator is defined through torch.library.Library rather than the custom_op decorator: the
# decorator wraps every implementation so that its first eager call imports torch._dynamo
# (seconds), a cost an inference-only op need not charge to eager users.
_LIB = torch.library.Library("sj_parallel_conversion", "DEF")
_ARGS = "int T, Tensor theta_pre, Tensor psi, Tensor psi_da, Tensor spike_value, int channel_dim, bool late"
_LIB.define(f"fire(Tensor x_seq, {_ARGS}) -> Tensor")
# The in-place form: the spikes overwrite the currents (T_in == T). It saves allocating the
# output, which on CPU costs a page fault per 4 KiB of a tensor as large as T x N images.
_LIB.define(f"fire_(Tensor(a!) x_seq, {_ARGS}) -> ()")
# The checked forms raise NaNMeanError where a neuron's time mean is NaN: the kernels see it in
# the same pass (a separate check would read the input again), and raising inside the operator
# keeps a compiled graph whole where reading a flag back would break it.
_LIB.define(f"fire_checked(Tensor x_seq, {_ARGS}) -> Tensor")
_LIB.define(f"fire_checked_(Tensor(a!) x_seq, {_ARGS}) -> ()")


def _run(x_seq, T, params, channel_dim, late, inplace, checked):
    """The operators' body on CPU and CUDA: the implementation the setting in force picks for
    ``x_seq`` (:func:`resolve_backend`), out of place or over ``x_seq``."""
    check_steps(T, x_seq)  # again here for callers of the operators themselves (fire_op)
    if inplace and x_seq.shape[0] != T:
        raise ValueError(f"fire_ overwrites its input with the spikes, so it needs T_in == T; got "
                         f"T_in={x_seq.shape[0]}, T={T}")
    impl = resolve_backend(get_backend(), x_seq)
    nan_seen = torch.zeros(1, dtype=torch.int32, device=x_seq.device) if checked else None
    if inplace and impl == "native" and torch_backend.flat_steps(x_seq) is not None:
        out = native_backend.fire(x_seq, T, params, channel_dim, late, nan_seen, inplace=True)
    else:
        out = _IMPL[impl](x_seq, T, params, channel_dim, late, nan_seen)
        if inplace:
            # The torch and cupy implementations write a new tensor; copy_ also refuses an x_seq
            # whose elements share memory (an expanded input), as every in-place torch operation does.
            out = x_seq.copy_(out)
    if checked and bool(nan_seen.item()):
        raise NaNMeanError("NaN time-mean current")
    return None if inplace else out


def _kernel(inplace: bool, checked: bool):
    def impl(x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, late):
        return _run(x_seq, T, (theta_pre, psi, psi_da, spike_value), channel_dim, late, inplace, checked)
    return impl


def _fire_fake(x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, late):
    # Every step of the output has the memory layout of the input's steps (every implementation).
    return x_seq.new_empty_strided((T,) + tuple(x_seq.shape[1:]), formulas.step_strides(x_seq[0], T))


def _fire_setup_context(ctx, inputs, output):
    pass


INFERENCE_ONLY = ("ParallelConversionNode is an inference-only operator: its spikes are a step function "
                  "of the input and have no useful gradient. Train the ANN (QCFS/ReLU) and convert it.")


def _fire_backward(ctx, grad):
    raise RuntimeError(INFERENCE_ONLY)


class _InferenceOnly(torch.autograd.Function):
    """The identity, whose backward raises as the spike operator's does."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(INFERENCE_ONLY)


def inference_only(x: torch.Tensor) -> torch.Tensor:
    """``x``, marked so that a backward through it raises: the count domain's floor would
    otherwise pass zero gradients silently where the spike level raises."""
    return _InferenceOnly.apply(x) if x.requires_grad else x


for _name, _inplace, _checked in (("fire", False, False), ("fire_", True, False), ("fire_checked", False, True),
                                  ("fire_checked_", True, True)):
    for _key in ("CPU", "CUDA"):
        _LIB.impl(_name, _kernel(_inplace, _checked), _key)
    if _inplace:
        torch.library.register_fake(f"sj_parallel_conversion::{_name}", lambda *args: None, lib=_LIB)
    else:
        torch.library.register_fake(f"sj_parallel_conversion::{_name}", _fire_fake, lib=_LIB)
        torch.library.register_autograd(f"sj_parallel_conversion::{_name}", _fire_backward,
                                        setup_context=_fire_setup_context, lib=_LIB)

_OPS = torch.ops.sj_parallel_conversion
#: The operator ``sj_parallel_conversion::fire`` (``torch.ops.sj_parallel_conversion.fire``):
#: spikes ``[T, N, ...]`` for currents ``[T_in, N, ...]``; see :func:`fire` for the arguments.
fire_op = _OPS.fire.default
#: ``sj_parallel_conversion::fire_``: the same spikes written over ``x_seq`` (``T_in == T``).
fire_inplace_op = _OPS.fire_.default
#: ``sj_parallel_conversion::fire_checked`` and ``fire_checked_``: the same, raising
#: :class:`NaNMeanError` where a neuron's time mean is NaN.
fire_checked_op = _OPS.fire_checked.default
fire_checked_inplace_op = _OPS.fire_checked_.default


def _selected(backend: str) -> str:
    """The setting a call with ``backend`` runs under: its own, or the one in force for "auto"."""
    return get_backend() if backend == "auto" else backend


def overwrites_in_one_pass(backend: str, x_seq: torch.Tensor) -> bool:
    """Whether ``fire_`` on ``x_seq`` under ``backend`` writes the spikes in the kernel's own pass
    (the native kernel on dense steps) rather than computing a new tensor and copying it back
    (torch, cupy): only then does overwriting the input save memory traffic."""
    return (resolve_backend(_selected(check_backend(backend)), x_seq) == "native"
            and torch_backend.flat_steps(x_seq) is not None)


def _scope(backend: str, x_seq: torch.Tensor):
    """The context a call with ``backend`` runs the operator in."""
    if backend == "auto":
        return contextlib.nullcontext()
    if torch.compiler.is_compiling():
        # A traced graph runs without this Python frame, so a scope set here would not reach the
        # operator; check what can be checked now, and the setting in force at run time applies.
        _check_runs_on(backend, x_seq)
        return contextlib.nullcontext()
    return use_backend(backend)


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
    inplace: bool = False,
) -> torch.Tensor:
    """Spikes ``[T, N, ...]`` of parallel conversion neurons for currents ``[T_in, N, ...]``.

    Arguments are checked here, before the operator runs (``T >= 1`` and ``T_in >= 1`` among them,
    so no implementation ever sees an input without time steps). ``backend`` other than
    ``"auto"`` runs the call under :func:`use_backend`. With ``check_nan`` a NaN time mean raises
    :class:`NaNMeanError` (a host synchronisation; off by default). ``inplace=True`` writes the
    spikes over ``x_seq`` and returns it (needs ``T_in == T`` and no gradient).
    """
    check_steps(T, x_seq)
    check_backend(backend)
    formulas.check_spike_order(order, "order")
    args = (x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, order == "late")
    if inplace:
        if x_seq.shape[0] != T:
            raise ValueError(f"inplace=True overwrites the input with the spikes, so it needs T_in == T; got "
                             f"input of shape {tuple(x_seq.shape)} and T={T}")
        if formulas.needs_grad(x_seq, theta_pre, psi, psi_da, spike_value):
            # fire_ has no autograd formula: out of place, backward raises; in place, the spikes
            # would silently lose their link to a parameter that requires grad.
            raise ValueError("inplace=True cannot overwrite an input that requires grad, nor use parameters that do")
    with _scope(backend, x_seq):
        if not inplace:
            return (fire_checked_op if check_nan else fire_op)(*args)
        (fire_checked_inplace_op if check_nan else fire_inplace_op)(*args)
    return x_seq


def count(
    mean_current: torch.Tensor,
    T: int,
    theta_pre: torch.Tensor,
    psi: torch.Tensor,
    psi_da: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    channel_dim: int = 1,
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """Spike counts ``k`` (times ``scale`` when given) for time-mean currents ``[N, ...]``.

    :func:`.formulas.spike_count` with scalar or per-channel 1-D parameters. Where the setting
    (``backend``, or the one in force for ``"auto"``) is ``"auto"`` or ``"native"``, for dense
    float32/float64 CPU tensors that need no gradient, outside ``torch.compile`` (which fuses the
    operations itself) and where the native count kernel runs (built, on an x86-64 CPU with AVX2),
    one pass of that kernel computes it; elsewhere the reference operations do
    (:func:`.torch_backend.count`). Both give the same bits, so the count domain never depends
    on which ran (and never needs the spike kernel of ``backend``). Float16 and bfloat16 counts
    are computed in float32, as the spike path computes them, and rounded once.
    """
    check_steps(T)
    check_backend(backend)
    params = (theta_pre, psi, psi_da)
    # Under torch.compile the torch operations are traced (and fused); nothing else is looked at.
    if (not torch.compiler.is_compiling() and mean_current.device.type == "cpu"
            and mean_current.dtype in native_backend.DTYPES and _selected(backend) in ("auto", "native")
            and native_backend.count_available() and native_backend.dense(mean_current)
            and not formulas.needs_grad(mean_current, *params, scale)):
        return native_backend.count(mean_current, T, params, scale, channel_dim, inplace=inplace)
    return torch_backend.count(mean_current, T, params, scale, channel_dim, inplace=inplace)
