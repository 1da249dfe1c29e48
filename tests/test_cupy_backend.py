"""The cupy (CUDA) backend against the torch backend, bit for bit; backend selection.

The CUDA tests skip where ``torch.cuda.is_available()`` is False or cupy cannot run kernels; the
selection tests at the bottom run everywhere.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from sj_parallel_conversion import ParallelConversionNode, kernels
from sj_parallel_conversion.kernels import cupy_backend

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False")


@pytest.fixture(scope="module")
def cupy_ready():
    pytest.importorskip("cupy", reason="cupy is not installed (pip install sj-parallel-conversion[cupy])")
    reason = cupy_backend.availability()
    if reason is not None:
        pytest.skip(f"cupy cannot run kernels here: {reason}")
    return torch.device("cuda")


# (per-step shape, channel_dim, channel count C or None for scalar parameters)
CASES = [
    ((7,), 0, None),
    ((5, 3), 1, 3),
    ((4, 3, 6), 1, 3),
    ((4, 6, 3), -1, 3),
    ((2, 5, 4, 4), 1, 5),
    ((2, 3, 4, 5), 2, 4),
    ((2, 16, 8, 8), -3, 16),
    ((3, 17, 9), 1, None),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TS = [(1, 1), (4, 4), (8, 3), (5, 16), (32, 32)]


def _params(C, dtype_params, g, device):
    if C is None:
        return dict(v_threshold=0.9, spike_value=1.1, psi=0.4, psi_da=-0.05)
    r = lambda lo, hi: (torch.rand(C, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype_params)  # noqa: E731
    return dict(v_threshold=r(0.3, 2.0), spike_value=r(0.3, 2.0), psi=r(0.0, 1.0), psi_da=r(-0.3, 0.3))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,T_in", TS)
@pytest.mark.parametrize("order", ["late", "early"])
def test_cupy_equals_torch_bitwise(cupy_ready, dtype, T, T_in, order):
    device = cupy_ready
    g = torch.Generator().manual_seed(T * 100 + T_in)
    for (step_shape, cd, C), pdtype in itertools.product(CASES, [torch.float32, torch.float64]):
        kw = _params(C, pdtype, g, device)
        x = (torch.randn((T_in,) + step_shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
        x = x.to(device)
        a = ParallelConversionNode(T, channel_dim=cd, backend="cupy", spike_order=order, **kw).to(device)
        b = ParallelConversionNode(T, channel_dim=cd, backend="torch", spike_order=order, **kw).to(device)
        ya, yb = a(x), b(x)
        assert ya.dtype == dtype and ya.shape == (T,) + step_shape
        assert torch.equal(ya, yb), (step_shape, cd, C, dtype, T, T_in)
        # non-contiguous input (a transposed view) gives the same bits too
        if x.dim() >= 3 and C is None:
            xt = x.transpose(-1, -2)
            assert torch.equal(a(xt), b(xt))


@needs_cuda
@pytest.mark.cuda
def test_cupy_special_values_and_empty(cupy_ready):
    device = cupy_ready
    x = torch.tensor([[float("inf"), float("-inf"), 0.3, float("nan"), 1e30, -1e30]], device=device)
    a = ParallelConversionNode(5, backend="cupy", check_nan=False)
    b = ParallelConversionNode(5, backend="torch", check_nan=False)
    assert torch.equal(a(x).nan_to_num(), b(x).nan_to_num())
    assert torch.equal((a(x) != 0).sum(0).cpu(), torch.tensor([5, 0, 2, 0, 5, 0]))
    e = torch.empty(3, 0, 4, device=device)
    assert a(e).shape == (5, 0, 4)


@needs_cuda
@pytest.mark.cuda
def test_auto_picks_cupy_on_cuda(cupy_ready, monkeypatch):
    device = cupy_ready
    x = torch.randn(4, 8, 3, device=device)
    assert kernels.resolve_backend("auto", x) == "cupy"
    calls = []
    real = kernels._IMPL["cupy"]

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setitem(kernels._IMPL, "cupy", spy)
    node = ParallelConversionNode(4, backend="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = node(x)
    assert calls and torch.equal(y, ParallelConversionNode(4, backend="torch")(x))


@needs_cuda
@pytest.mark.cuda
def test_cupy_backward_raises(cupy_ready):
    device = cupy_ready
    x = torch.randn(3, 4, 5, device=device, requires_grad=True)
    y = ParallelConversionNode(4, backend="cupy")(x)
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()


@needs_cuda
@pytest.mark.cuda
def test_cupy_rejects_cpu_tensors(cupy_ready):
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        ParallelConversionNode(4, backend="cupy")(torch.randn(2, 3))


# -- issue 24: the faults a first GPU run would hit ------------------------------------------------
def _steps_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    if layout == "sliced":
        return torch.stack([x, x], dim=-1).flatten(-2)[..., ::2]
    return x


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cupy_equals_torch_in_every_layout_with_per_channel_parameters(cupy_ready, layout, dtype):
    device = cupy_ready
    g = torch.Generator().manual_seed(7)
    kw = _params(6, torch.float32, g, device)
    x = _steps_layout((torch.randn(3, 4, 6, 5, 7, generator=g) * 1.5 + 0.3).to(dtype).to(device), layout)
    a = ParallelConversionNode(5, backend="cupy", **kw).to(device)
    b = ParallelConversionNode(5, backend="torch", **kw).to(device)
    ya, yb = a(x), b(x)
    assert ya.stride() == yb.stride()  # the output keeps the steps' layout (channels-last stays so)
    assert torch.equal(ya, yb)


@needs_cuda
@pytest.mark.cuda
def test_cupy_keeps_subnormal_currents_and_thresholds(cupy_ready):
    """Built without flush-to-zero: subnormal float32 values count as the torch backend counts them."""
    device = cupy_ready
    tiny = torch.finfo(torch.float32).tiny  # smallest normal; the values below are subnormal
    x = (torch.linspace(-4, 8, 4096) * tiny / 8).reshape(1, 4096).to(device)
    assert bool(((x.abs() < tiny) & (x != 0)).any())
    for theta in (tiny / 4, tiny / 64, 1.0):
        a = ParallelConversionNode(8, v_threshold=theta, backend="cupy")
        b = ParallelConversionNode(8, v_threshold=theta, backend="torch")
        ya, yb = a.to(device)(x), b.to(device)(x)
        assert torch.equal(ya, yb), theta
    assert bool((ParallelConversionNode(8, v_threshold=tiny / 4, backend="cupy").to(device)(x) != 0).any())


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("T_in", [3, 7])
def test_torch_backend_time_mean_on_cuda_has_the_cpu_bits(T_in):
    """Division by a device tensor: CUDA gives the correctly rounded quotient, as the CPU does."""
    x = torch.randn(T_in, 100_000, generator=torch.Generator().manual_seed(T_in)) * 3
    from sj_parallel_conversion.kernels import torch_backend

    assert torch.equal(torch_backend.time_mean(x.cuda()).cpu(), torch_backend.time_mean(x))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cupy", "torch", "auto"])
def test_zero_time_steps_raise_and_leave_cuda_usable(cupy_ready, backend):
    device = cupy_ready
    node = ParallelConversionNode(4, backend=backend).to(device)
    with pytest.raises(ValueError, match="no time steps"):
        node(torch.empty(0, 2, 3, device=device))
    torch.cuda.synchronize()
    x = torch.randn(2, 2, 3, device=device)
    assert torch.equal(node(x), ParallelConversionNode(4, backend="torch").to(device)(x))


@needs_cuda
@pytest.mark.cuda
def test_cupy_runs_with_warnings_as_errors(cupy_ready):
    device = cupy_ready
    x = torch.randn(4, 8, 3, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ParallelConversionNode(4, backend="cupy", check_nan=True).to(device)(x)
    assert torch.equal(y, ParallelConversionNode(4, backend="torch").to(device)(x))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_counts_equal_the_spikes_on_cuda(cupy_ready, dtype):
    device = cupy_ready
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 16, 5, 5, generator=g) * 2).to(dtype).to(device)
    for backend in ("cupy", "torch"):
        node = ParallelConversionNode(8, v_threshold=torch.rand(16, generator=g) + 0.3, backend=backend).to(device)
        spikes = node(x.unsqueeze(0))
        assert torch.equal(node.count(x), (spikes != 0).sum(0).to(dtype))


# -- selection, no CUDA needed ------------------------------------------------------------------
def test_cupy_backend_on_cpu_tensor_is_a_value_error():
    with pytest.raises(ValueError, match="backend='cupy' needs a CUDA tensor"):
        kernels.resolve_backend("cupy", torch.randn(2, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("cuda", torch.randn(2, 3))


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA reason string; this machine has CUDA")
def test_availability_reports_a_reason_without_cuda():
    reason = cupy_backend.availability()
    assert isinstance(reason, str) and reason
    assert "cupy" in reason or "CUDA" in reason
