"""What ``kernels.fire`` and ``kernels.count`` check and compute before and around the backends,
all runnable on CPU: the time steps are validated before any backend runs (a spy backend must
never be called), half-precision counts follow the spike path's float32 arithmetic, and the
torch backend's CPU cache blocking stays on CPU."""
from __future__ import annotations

import pytest
import torch

from sj_parallel_conversion import ParallelConversionNode, formulas, kernels
from sj_parallel_conversion.kernels import native_backend, torch_backend

PARAMS = (torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.0), torch.tensor(1.0))


@pytest.fixture
def spies(monkeypatch):
    """Every backend's fire and count replaced by a spy that records its call and raises."""
    calls = []

    def spy(name):
        def run(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"backend {name} was called")
        return run

    for name in kernels.BACKENDS[1:]:
        monkeypatch.setitem(kernels._IMPL, name, spy(name))
    monkeypatch.setattr(native_backend, "count", spy("native count"))
    monkeypatch.setattr(formulas, "spike_count", spy("torch count"))
    return calls


# -- time steps are validated before any backend (issue 24, fault 3) -------------------------------
@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_fire_refuses_zero_input_steps_before_any_backend(spies, backend, inplace):
    x = torch.empty(0, 2, 3)
    with pytest.raises(ValueError, match="no time steps"):
        kernels.fire(x, 4, *PARAMS, backend=backend, inplace=inplace)
    assert spies == []


@pytest.mark.parametrize("T", [0, -1, 2.0, True])
def test_fire_and_count_refuse_a_bad_T_before_any_backend(spies, T):
    with pytest.raises(ValueError, match="T .output time steps. must be an integer >= 1"):
        kernels.fire(torch.randn(2, 3), T, *PARAMS)
    with pytest.raises(ValueError, match="T .output time steps. must be an integer >= 1"):
        kernels.count(torch.randn(2, 3), T, *PARAMS[:3])
    with pytest.raises(ValueError, match="T .output time steps. must be an integer >= 1"):
        kernels.count(torch.randn(2, 3), T, *PARAMS[:3], scale=torch.tensor(0.5), backend="torch")
    assert spies == []


def test_the_operators_themselves_refuse_zero_input_steps(spies):
    args = (4, *PARAMS, 1, True, "auto", False)
    with pytest.raises(ValueError, match="no time steps"):
        kernels.fire_op(torch.empty(0, 5), *args)
    with pytest.raises(ValueError, match="no time steps"):
        kernels.fire_inplace_op(torch.empty(0, 5), *args)
    with pytest.raises(ValueError, match="T_in must be >= 1"):
        ParallelConversionNode(4, backend="torch")(torch.empty(0, 2, 3))
    assert spies == []


def test_zero_neurons_with_time_steps_are_still_fine():
    y = kernels.fire(torch.empty(3, 0, 4), 5, *PARAMS, backend="torch")
    assert y.shape == (5, 0, 4)


# -- half precision counts follow the spike path's float32 arithmetic (issue 24, fault 5) -----------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [4, 16])
def test_half_precision_count_domain_equals_the_spike_level_time_mean(dtype, T):
    g = torch.Generator().manual_seed(T)
    C = 16
    # Per-channel parameters with long float32 mantissas: rounding them to half moves boundaries.
    node = ParallelConversionNode(T, v_threshold=torch.rand(C, generator=g) * 1.5 + 0.3, spike_value=1.0,
                                  bias=torch.rand(C, generator=g) * 0.2 - 0.1, backend="torch")
    x = (torch.randn(64, C, 16, 16, generator=g) * 1.2 + 0.4).to(dtype)
    spikes = node(x.unsqueeze(0))  # spike level, the image as one input step: its mean is x in float32
    assert spikes.dtype == dtype
    fired = (spikes != 0).sum(0)
    assert int(fired.min()) == 0 and int(fired.max()) == T  # silent and saturated neurons both occur
    assert torch.equal(node.count(x), fired.to(dtype))
    # spike_value 1 and T a power of two: every rate k / T is exact, so the count domain's output
    # equals the time mean of the spike-level output bit for bit.
    assert torch.equal(node.rate(x), spikes.float().mean(0).to(dtype))
    assert torch.equal(node.rate(x.clone(), inplace=True), node.rate(x))
    assert torch.equal(kernels.count(x, T, node.v_threshold, node.shift, node.bias), fired.to(dtype))
