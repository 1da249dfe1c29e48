"""What ``kernels.fire`` and ``kernels.count`` check and compute before and around the backends,
all runnable on CPU: the time steps are validated before any backend runs (a spy backend must
never be called), half-precision counts follow the spike path's float32 arithmetic, and the
torch backend's CPU cache blocking stays on CPU."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sj_parallel_conversion import NetworkSettings, ParallelConversionNode, formulas, kernels
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
    args = (4, *PARAMS, 1, True)
    for op in (kernels.fire_op, kernels.fire_inplace_op, kernels.fire_checked_op, kernels.fire_checked_inplace_op):
        with pytest.raises(ValueError, match="no time steps"):
            op(torch.empty(0, 5), *args)
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
                                  psi_da=torch.rand(C, generator=g) * 0.2 - 0.1, backend="torch")
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
    assert torch.equal(kernels.count(x, T, node.v_threshold, node.psi, node.psi_da), fired.to(dtype))


# -- choosing the implementation: by device, with one setting (issue 25) ---------------------------
OPS = (kernels.fire_op, kernels.fire_inplace_op, kernels.fire_checked_op, kernels.fire_checked_inplace_op)


def test_operator_schemas_carry_tensors_and_the_neuron_shape_only():
    for op in OPS:
        args = op._schema.arguments
        assert [a.name for a in args] == ["x_seq", "T", "theta_pre", "psi", "psi_da", "spike_value", "channel_dim",
                                          "late"], op
        assert not any(str(a.type) == "str" for a in args), op


@pytest.fixture
def recorded(monkeypatch):
    """The implementations that run, in order (each still computes its result)."""
    calls = []
    for name in ("torch", "native"):
        real = kernels._IMPL[name]
        monkeypatch.setitem(kernels._IMPL, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    yield calls
    kernels.set_backend("auto")


def test_the_process_setting_and_a_scoped_one_choose_the_implementation(recorded):
    if native_backend.availability() is not None:
        pytest.skip(f"the native kernel is unavailable: {native_backend.availability()}")
    x = torch.randn(4, 3, 5)
    want = kernels.fire(x, 4, *PARAMS, backend="torch")
    recorded.clear()
    assert kernels.get_backend() == "auto"
    assert torch.equal(kernels.fire_op(x, 4, *PARAMS, 1, True), want)
    kernels.set_backend("torch")
    assert kernels.get_backend() == "torch"
    assert torch.equal(ParallelConversionNode(4)(x), want)  # a node with backend="auto" follows it
    with kernels.use_backend("native"):
        assert kernels.get_backend() == "native"
        assert torch.equal(kernels.fire_op(x, 4, *PARAMS, 1, True), want)
    assert kernels.get_backend() == "torch"
    assert torch.equal(ParallelConversionNode(4, backend="native")(x), want)  # the node's own setting wins
    assert kernels.get_backend() == "torch"  # and ends with its call
    assert recorded == ["native", "torch", "native", "native"]


def test_a_node_backend_is_the_scoped_setting_of_its_calls(recorded, monkeypatch):
    x = torch.randn(4, 3, 5)
    node = ParallelConversionNode(4, backend="torch")
    node(x)
    node(x.clone())
    assert recorded == ["torch", "torch"] and kernels.get_backend() == "auto"
    # count follows the same setting: backend="torch" never runs the native count kernel
    counted = []
    real = native_backend.count
    monkeypatch.setattr(native_backend, "count", lambda *a, **k: counted.append(1) or real(*a, **k))
    node.count(torch.randn(3, 5))
    with kernels.use_backend("torch"):
        ParallelConversionNode(4).count(torch.randn(3, 5))
    assert counted == []


def test_a_use_backend_block_is_local_to_its_thread():
    import threading

    seen = {}
    with kernels.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.setdefault("other", kernels.get_backend()))
        t.start()
        t.join()
        seen["here"] = kernels.get_backend()
    assert seen == {"other": "auto", "here": "torch"}


@pytest.mark.parametrize("call", [
    lambda: kernels.set_backend("cuda"),
    lambda: kernels.use_backend("triton").__enter__(),
    lambda: kernels.fire(torch.randn(2, 3), 4, *PARAMS, backend="opencl"),
    lambda: kernels.count(torch.randn(2, 3), 4, *PARAMS[:3], backend="opencl"),
    lambda: ParallelConversionNode(4, backend="gpu"),
    lambda: kernels.check_backend(None),
])
def test_backend_names_are_refused_with_one_message(call):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'native', 'cupy'\)"):
        call()
    assert kernels.get_backend() == "auto"


def test_backend_names_and_spike_orders_are_checked_in_one_place_each():
    """No module but kernels tests a backend name against the list, and none but formulas tests
    a spike order against ("late", "early"): each has one check every caller calls."""
    package = Path(kernels.__file__).parents[1]
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(package).as_posix()
        backend_tests = re.findall(r"\bin (?:kernels\.)?BACKENDS\b", text)
        order_lists = re.findall(r"[(\[]\s*[\"']late[\"'],\s*[\"']early[\"']\s*[)\]]", text)
        assert len(backend_tests) == (1 if rel == "kernels/__init__.py" else 0), rel
        assert len(order_lists) == (1 if rel == "formulas.py" else 0), rel


@pytest.mark.parametrize("backend", ["torch", "native", "auto"])
def test_compiled_nodes_of_every_backend_stay_one_graph(backend):
    if backend == "native" and native_backend.availability() is not None:
        pytest.skip(f"the native kernel is unavailable: {native_backend.availability()}")
    torch._dynamo.reset()
    node = ParallelConversionNode(4, v_threshold=torch.rand(3) + 0.5, backend=backend)
    x = torch.randn(4, 2, 3, 5)
    for check_nan in (False, True):
        node.check_nan = check_nan
        compiled = torch.compile(node, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), node(x))
    # the setting in force when the compiled graph runs chooses the implementation
    with kernels.use_backend("torch"):
        assert torch.equal(compiled(x), node(x))
    # the NaN check raises inside the operator: a ValueError, compiled or not
    x[1, 0, 2, 3] = float("nan")
    for run in (node, compiled):
        with pytest.raises(ValueError, match="NaN"):
            run(x)


def test_a_node_backend_that_cannot_run_is_refused_when_traced():
    torch._dynamo.reset()
    node = torch.compile(ParallelConversionNode(4, backend="cupy"), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="backend='cupy' needs a CUDA tensor"):
        node(torch.randn(4, 2, 3))


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_saved_networks_keep_their_nodes_backend(tmp_path, backend):
    """A node's backend is a constructor argument read back from the node, so saved networks keep
    it, and a loaded one runs under it."""
    import torch.nn as nn

    from sj_parallel_conversion import ParallelConverter, load_snn, save_snn, spike_inference

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    x = torch.randn(8, 3, 6, 6)
    snn = ParallelConverter("parallel", T=4, dataloader=[x], progress=False, method="ema",
                            network=NetworkSettings(backend=backend)).convert(ann)
    save_snn(snn, tmp_path / "snn.pt")
    loaded = load_snn(tmp_path / "snn.pt")
    nodes = [m for m in loaded.modules() if isinstance(m, ParallelConversionNode)]
    assert nodes and all(n.backend == backend for n in nodes)
    assert torch.equal(spike_inference(loaded, x), spike_inference(snn, x))
