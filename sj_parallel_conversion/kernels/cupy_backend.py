"""CUDA implementation: one fused cupy kernel per dtype (``csrc/cupy_fire.cu``, package data)
that sums the input steps of a neuron, computes its spike count and writes its T output values.

The kernel mirrors :mod:`.torch_backend` operation by operation (sequential float32/float64 sum,
IEEE division, no fused multiply-add, subnormals kept) so that both backends give identical
bits. It reads and writes every dense step layout (contiguous, channels-last, any permutation) in
memory order, so such inputs are neither copied in nor copied out.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .. import formulas
from . import sources
from .torch_backend import accumulation_dtype, flat_steps

#: The kernel source in ``kernels/csrc`` (package data).
SOURCE = "cupy_fire.cu"


def source() -> str:
    """The CUDA source of the kernels (``csrc/cupy_fire.cu``)."""
    return sources.read(SOURCE)


_KERNEL_NAMES = {
    torch.float32: "sjpc_fire_f32",
    torch.float64: "sjpc_fire_f64",
    torch.float16: "sjpc_fire_f16",
    torch.bfloat16: "sjpc_fire_bf16",
}

#: The NVRTC options of the kernel. No contraction into fused multiply-adds (the torch backend
#: rounds after every operation), IEEE division and square root, and no flush-to-zero: with
#: ``-ftz=true`` a subnormal float32 current, mean or threshold would count as zero here but not
#: in the torch backend. cupy's ``RawModule(code=...)`` appends ``-ftz=true`` after the caller's
#: options (NVRTC keeps the last), so :func:`_module` compiles with NVRTC itself.
NVRTC_OPTIONS = ("--std=c++14", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")


@functools.lru_cache(maxsize=1)
def availability() -> Optional[str]:
    """``None`` when cupy can run kernels here, else the reason it cannot."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return f"cupy is not importable ({exc.__class__.__name__}: {exc})"
    try:
        if not cupy.cuda.is_available():
            return "cupy imports but finds no CUDA device"
    except Exception as exc:
        return f"cupy cannot query CUDA ({exc})"
    return None


def compile_options() -> tuple:
    """:data:`NVRTC_OPTIONS` plus the include folder of the CUDA headers the source uses
    (``cuda_fp16.h``, ``cuda_bf16.h``), as cupy locates the toolkit."""
    import cupy

    root = cupy.cuda.get_cuda_path()
    if root is None:
        raise RuntimeError("cupy cannot locate the CUDA toolkit headers (cuda_fp16.h) that the kernel includes; "
                           "install the CUDA runtime headers (pip install sj-parallel-conversion[cupy]) or set "
                           "CUDA_PATH")
    return NVRTC_OPTIONS + (f"-I{os.path.join(root, 'include')}",)


@functools.lru_cache(maxsize=None)
def _module(device_index: int) -> Dict[str, object]:
    """The four kernels, compiled by NVRTC with :func:`compile_options` for ``device_index`` and
    loaded on that device."""
    import cupy
    from cupy.cuda import compiler

    with cupy.cuda.Device(device_index):
        binary = compiler.compile_using_nvrtc(source(), compile_options())
        if isinstance(binary, tuple):  # cupy 14 returns (binary, name mapping)
            binary = binary[0]
        is_ptx = isinstance(binary, str)
        data = binary.encode() if is_ptx else binary
        # RawModule(path=...) reads the file when a kernel is first loaded on a device, so the
        # file lives as long as the process.
        path = os.path.join(_binary_folder(), f"sjpc_fire_{device_index}" + (".ptx" if is_ptx else ".cubin"))
        with open(path, "wb") as f:
            f.write(data)
        module = cupy.RawModule(path=path)
        kernels = {name: module.get_function(name) for name in _KERNEL_NAMES.values()}
        for kernel in kernels.values():
            kernel.compile()  # load it on this device now: a bad binary fails here, not at a launch
        return kernels


@functools.lru_cache(maxsize=1)
def _binary_folder() -> str:
    folder = tempfile.mkdtemp(prefix="sjpc_cupy_")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def launch_stream(device: torch.device):
    """torch's current stream on ``device`` as a cupy stream, so the kernel is ordered with the
    torch operations around it (through the CUDA stream protocol; cupy 14 deprecates
    ``ExternalStream``)."""
    import cupy

    return cupy.cuda.Stream.from_external(torch.cuda.current_stream(device))


class Launch(NamedTuple):
    """What the kernel is launched with: input ``x`` and output ``out`` (dense steps of one layout,
    indexed in memory order), the four parameters as ``C``-element vectors in the accumulation
    dtype, the neurons per step ``M``, the input steps ``T_in``, the output steps ``T`` and the
    memory stride ``inner`` of the channel axis within a step (a neuron at offset ``i`` of its
    step is in channel ``(i // inner) % C``)."""

    x: torch.Tensor
    out: torch.Tensor
    params: List[torch.Tensor]
    M: int
    T_in: int
    T: int
    inner: int
    C: int


def prepare(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int) -> Launch:
    """The kernel's arguments for ``x_seq`` (any device; the tests run them on a host build).

    Dense steps sharing one layout (contiguous, channels-last, ...) are read where they are;
    anything else is copied once into dense steps with the layout of ``x_seq[0]``. The output
    has that step layout too (as the torch backend and the operator's fake implementation give
    it), so it is never copied back.
    """
    T_in, step_shape = x_seq.shape[0], x_seq.shape[1:]
    x = x_seq
    if flat_steps(x) is None:
        x = torch.empty_strided(x.shape, formulas.step_strides(x[0], T_in), dtype=x.dtype,
                                device=x.device).copy_(x)
    acc = accumulation_dtype(x.dtype)
    vecs = [p.to(device=x.device, dtype=acc).reshape(-1).contiguous() for p in params]
    cd = formulas.check_channels(step_shape, channel_dim, [p.numel() for p in vecs], "the cupy kernel")
    C = max(p.numel() for p in vecs)
    inner = 1
    if C > 1:
        vecs = [p.expand(C).contiguous() if p.numel() == 1 else p for p in vecs]
        inner = x.stride(cd + 1)
    out = torch.empty_strided((T,) + tuple(step_shape), formulas.step_strides(x[0], T), dtype=x.dtype,
                              device=x.device)
    return Launch(x, out, vecs, step_shape.numel(), T_in, T, inner, C)


def fire(x_seq: torch.Tensor, T: int, params: Sequence[torch.Tensor], channel_dim: int, late: bool,
         nan_seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as :func:`.torch_backend.fire` (``params`` is ``(theta_pre, psi, psi_da,
    spike_value)``), for CUDA tensors."""
    import cupy

    if x_seq.dtype not in _KERNEL_NAMES:
        raise TypeError(f"cupy backend supports {sorted(map(str, _KERNEL_NAMES))}, got {x_seq.dtype}")
    a = prepare(x_seq, T, params, channel_dim)
    if a.M == 0:
        return a.out
    index = a.x.device.index if a.x.device.index is not None else torch.cuda.current_device()
    kernel = _module(index)[_KERNEL_NAMES[a.x.dtype]]
    threads = 256
    blocks = min((a.M + threads - 1) // threads, 65535 * 8)
    with cupy.cuda.Device(index):
        kernel(
            (blocks,), (threads,),
            (a.x.data_ptr(), a.out.data_ptr(), *[p.data_ptr() for p in a.params],
             cupy.int64(a.M), cupy.int32(a.T_in), cupy.int32(a.T), cupy.int64(a.inner), cupy.int32(a.C),
             cupy.int32(1 if late else 0), nan_seen.data_ptr() if nan_seen is not None else 0),
            stream=launch_stream(a.x.device),
        )
    return a.out
