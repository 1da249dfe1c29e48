"""Backend dispatch for the parallel conversion neuron, as a ``torch.library`` custom operator.

The neuron is the operator ``sj_parallel_conversion::fire`` (as SpikingJelly 2.0 registers its own
neurons). Three implementations compute the same bits: plain torch operations (any device and
dtype), a fused C++ kernel for float32/float64 CPU tensors (built with the host's compiler on
first use) and a fused cupy kernel for CUDA tensors. ``backend="auto"`` picks the fused kernel of
the tensor's device when it can run, and otherwise torch with a one-time warning saying why. A fake
implementation gives the output's shape and dtype, so ``torch.compile(..., fullgraph=True)``
traces a converted network without a graph break. The operator's backward raises: the node is an
inference operator and silently returning zero gradients through ``floor`` would be wrong.

``sj_parallel_conversion::fire_`` writes the same spikes over its input (``T_in == T``), which a
converted network uses where it alone reads the currents (:mod:`sj_parallel_conversion.reuse`). :func:`count` is the
count domain's quantiser: one pass of the native kernel on AVX2 CPUs, torch operations elsewhere,
the same bits either way.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .. import formulas
from . import cupy_backend, native_backend, torch_backend

BACKENDS = ("auto", "torch", "native", "cupy")
OP_NAME = "sj_parallel_conversion::fire"


class NaNMeanError(ArithmeticError):
    """A neuron's time-mean input is NaN (raised by a backend when asked to check)."""


_warned: set = set()


def _fallback(kind: str, reason: str) -> str:
    if kind not in _warned:
        warnings.warn(f"backend='auto': {reason}; using the torch backend (pass backend='torch' to choose it "
                      "and silence this warning)", RuntimeWarning, stacklevel=4)
        _warned.add(kind)
    return "torch"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map a requested backend to the one that will run on ``x``, or raise why it cannot."""
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
    if backend == "native":
        if x.device.type != "cpu":
            raise ValueError(f"backend='native' needs a CPU tensor, got one on {x.device}; use backend='cupy', "
                             "'torch' or 'auto' there")
        if x.dtype not in native_backend.DTYPES:
            raise TypeError(f"backend='native' supports {[str(d) for d in native_backend.DTYPES]}, got {x.dtype}; "
                            "use backend='torch' or 'auto'")
        reason = native_backend.availability()
        if reason is not None:
            raise RuntimeError(f"backend='native' is unavailable: {reason}")
        return "native"
    # auto
    if x.is_cuda:
        reason = cupy_backend.availability()
        return "cupy" if reason is None else _fallback("cupy", reason)
    if x.device.type != "cpu" or x.dtype not in native_backend.DTYPES:
        # float16/bfloat16 on CPU, or another device: the torch operations are the implementation.
        return "torch"
    reason = native_backend.availability()
    return "native" if reason is None else _fallback("native", f"the native CPU kernel cannot be built ({reason})")


_IMPL = {"torch": torch_backend.fire, "native": native_backend.fire, "cupy": cupy_backend.fire}


def check_steps(T: int, x_seq: Optional[torch.Tensor] = None) -> None:
    """Raise ``ValueError`` unless ``T`` is an integer >= 1 and ``x_seq`` (when given) has at
    least one time step along its leading axis.

    Every entry point calls this before dispatching: the backends index the first input step,
    and the cupy kernel given ``T_in == 0`` would read a zero-size allocation, an illegal address
    that leaves the CUDA context unusable for the rest of the process.
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
_LIB.define(
    "fire(Tensor x_seq, int T, Tensor theta_pre, Tensor psi, Tensor psi_da, Tensor spike_value, "
    "int channel_dim, bool late, str backend, bool check_nan) -> Tensor"
)


def _fire_impl(x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, late, backend, check_nan):
    # CPU: the native kernel unless backend="torch", the dtype is half precision or it cannot be
    # built; CUDA: the fused cupy kernel unless backend="torch" or cupy is unavailable.
    check_steps(T, x_seq)  # again here for callers of the operator itself (fire_op)
    impl = resolve_backend(backend, x_seq)
    return _IMPL[impl](x_seq, T, (theta_pre, psi, psi_da, spike_value), channel_dim,
                       "late" if late else "early", check_nan)


_LIB.impl("fire", _fire_impl, "CPU")
_LIB.impl("fire", _fire_impl, "CUDA")


def _fire_fake(x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, late, backend, check_nan):
    # Every step of the output has the memory layout of the input's steps (both backends).
    return x_seq.new_empty_strided((T,) + tuple(x_seq.shape[1:]), formulas.step_strides(x_seq[0], T))


torch.library.register_fake(OP_NAME, _fire_fake, lib=_LIB)


def _fire_setup_context(ctx, inputs, output):
    pass


def _fire_backward(ctx, grad):
    raise RuntimeError(
        "ParallelConversionNode is an inference-only operator: its spikes are a step function "
        "of the input and have no useful gradient. Train the ANN (QCFS/ReLU) and convert it."
    )


torch.library.register_autograd(OP_NAME, _fire_backward, setup_context=_fire_setup_context, lib=_LIB)

# The in-place form: the spikes overwrite the currents (T_in == T). It saves allocating the
# output, which on CPU costs a page fault per 4 KiB of a tensor as large as T x N images.
_LIB.define(
    "fire_(Tensor(a!) x_seq, int T, Tensor theta_pre, Tensor psi, Tensor psi_da, Tensor spike_value, "
    "int channel_dim, bool late, str backend, bool check_nan) -> ()"
)


def _fire_inplace_impl(x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, late, backend, check_nan):
    check_steps(T, x_seq)
    if x_seq.shape[0] != T:
        raise ValueError(f"fire_ overwrites its input with the spikes, so it needs T_in == T; got "
                         f"T_in={x_seq.shape[0]}, T={T}")
    impl = resolve_backend(backend, x_seq)
    params, order = (theta_pre, psi, psi_da, spike_value), "late" if late else "early"
    if impl == "native" and torch_backend.flat_steps(x_seq) is not None:
        native_backend.fire(x_seq, T, params, channel_dim, order, check_nan, inplace=True)
    else:
        # The torch and cupy backends write a new tensor; copy_ also refuses an x_seq whose
        # elements share memory (an expanded input), as every in-place torch operation does.
        x_seq.copy_(_IMPL[impl](x_seq, T, params, channel_dim, order, check_nan))


def overwrites_in_one_pass(backend: str, x_seq: torch.Tensor) -> bool:
    """Whether ``fire_`` on ``x_seq`` writes the spikes in the kernel's own pass (the native kernel
    on dense steps) rather than computing a new tensor and copying it back (torch, cupy): only
    then does overwriting the input save memory traffic."""
    return resolve_backend(backend, x_seq) == "native" and torch_backend.flat_steps(x_seq) is not None


_LIB.impl("fire_", _fire_inplace_impl, "CPU")
_LIB.impl("fire_", _fire_inplace_impl, "CUDA")
torch.library.register_fake("sj_parallel_conversion::fire_", lambda *args: None, lib=_LIB)

#: The operator ``sj_parallel_conversion::fire`` (``torch.ops.sj_parallel_conversion.fire``):
#: spikes ``[T, N, ...]`` for currents ``[T_in, N, ...]``; see :func:`fire` for the arguments.
fire_op = torch.ops.sj_parallel_conversion.fire.default
#: ``sj_parallel_conversion::fire_``: the same spikes written over ``x_seq`` (``T_in == T``).
fire_inplace_op = torch.ops.sj_parallel_conversion.fire_.default


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
    so no backend ever sees an input without time steps). With ``check_nan`` a NaN time mean
    raises :class:`NaNMeanError` (a host synchronisation; off by default). ``inplace=True``
    writes the spikes over ``x_seq`` and returns it (needs ``T_in == T`` and no gradient).
    """
    check_steps(T, x_seq)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if order not in ("late", "early"):
        raise ValueError(f"order must be 'late' or 'early', got {order!r}")
    args = (x_seq, T, theta_pre, psi, psi_da, spike_value, channel_dim, order == "late", backend, check_nan)
    if not inplace:
        return fire_op(*args)
    if x_seq.shape[0] != T:
        raise ValueError(f"inplace=True overwrites the input with the spikes, so it needs T_in == T; got "
                         f"input of shape {tuple(x_seq.shape)} and T={T}")
    if formulas.needs_grad(x_seq, theta_pre, psi, psi_da, spike_value):
        # fire_ has no autograd formula: out of place, backward raises; in place, the spikes
        # would silently lose their link to a parameter that requires grad.
        raise ValueError("inplace=True cannot overwrite an input that requires grad, nor use parameters that do")
    fire_inplace_op(*args)
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

    :func:`.formulas.spike_count` with scalar or per-channel 1-D parameters. With ``backend``
    ``"auto"`` or ``"native"``, for dense float32/float64 CPU tensors that need no gradient,
    outside ``torch.compile`` (which fuses the operations itself) and where the native count
    kernel runs (built, on an x86-64 CPU with AVX2), one pass of that kernel computes it;
    elsewhere the torch operations do. Both give the same bits, so the count domain never
    depends on which ran (and never needs the spike kernel of ``backend``). Float16 and
    bfloat16 counts are computed in float32, as the spike path computes them, and rounded once.
    """
    check_steps(T)
    params = (theta_pre, psi, psi_da) + (() if scale is None else (scale,))
    # Under torch.compile the torch operations are traced (and fused); nothing else is looked at.
    if (not torch.compiler.is_compiling() and backend in ("auto", "native") and mean_current.device.type == "cpu"
            and mean_current.dtype in native_backend.DTYPES and native_backend.count_available()
            and native_backend.dense(mean_current)
            and not formulas.needs_grad(mean_current, *params)):
        return native_backend.count(mean_current, T, params[:3], scale, channel_dim, inplace=inplace)
    # The spike path counts in the accumulation dtype (float32 for float16/bfloat16 currents,
    # with float32 parameters), so the count domain does too and rounds once at the end: a half
    # precision count then equals the spikes fired for the same mean. Parameters go to the
    # input's device, where dividing by them is IEEE division (a CPU scalar divisor would be
    # multiplied by its reciprocal on CUDA).
    work = torch_backend.accumulation_dtype(mean_current.dtype)
    nd = mean_current.dim()
    cv = [formulas.channel_view(p.to(dtype=work, device=mean_current.device), nd, channel_dim) for p in params]
    sc = cv[3] if scale is not None else None
    if work == mean_current.dtype:
        return formulas.spike_count(mean_current, T, *cv[:3], inplace=inplace, scale=sc)
    k = formulas.spike_count(mean_current.to(work), T, *cv[:3], inplace=True, scale=sc)
    if inplace and not formulas.needs_grad(mean_current, k):
        return mean_current.copy_(k)
    return k.to(mean_current.dtype)
