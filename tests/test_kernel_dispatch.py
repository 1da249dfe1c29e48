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
