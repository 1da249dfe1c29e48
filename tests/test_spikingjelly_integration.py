"""ParallelConversionNode as a SpikingJelly ``BaseNode`` in converted networks: monitors that look
for ``BaseNode``, ``set_step_mode`` refusing single-step mode without switching any module,
``reset_net``, the residual membrane potential ``v`` (against step-by-step integrate-and-fire
neurons, SpikingJelly's own included) and an op counter."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import base, functional, layer, monitor, neuron, op_counter
from torch import fx

from sj_parallel_conversion import ParallelConversionNode, ParallelConverter, load_snn, save_snn
from sj_parallel_conversion.tools.models import build_model
from sj_parallel_conversion.network import ConvertedNetwork, as_converted_network

F64 = torch.float64
T = 4


@pytest.fixture(scope="module")
def resnet():
    """A converted ResNet-20 (option-A shortcuts: padding and tensor-op step modules too) and the
    number of activation sites of its ANN's graph."""
    torch.manual_seed(0)
    ann = build_model("resnet20", num_classes=10, act="relu", shortcut="A").eval()
    traced = fx.symbolic_trace(ann)
    mods = dict(traced.named_modules())
    sites = sum(1 for n in traced.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.ReLU))
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    snn = ParallelConverter("parallel", T=T, dataloader=[calib], progress=False, method="ema").convert(ann)
    return snn, sites


def _x(n=2, steps=T):
    return torch.randn(steps, n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _nodes(net):
    return [(name, m) for name, m in net.named_modules() if isinstance(m, ParallelConversionNode)]


def _modes(net):
    return {name: m.step_mode for name, m in net.named_modules() if hasattr(m, "step_mode")}


def _store_v(net, on: bool):
    for _, m in _nodes(net):
        m.store_v = on


# -- the node is a BaseNode ------------------------------------------------------------------------
def test_node_is_a_base_node_with_its_threshold_as_a_buffer():
    node = ParallelConversionNode(T, v_threshold=torch.tensor([1.0, 2.0]))
    assert isinstance(node, neuron.BaseNode) and isinstance(node, base.MemoryModule)
    assert dict(node.named_buffers())["v_threshold"] is node.v_threshold
    assert node.v_threshold.tolist() == [1.0, 2.0]
    # the state (and so every saved file) is what it was before the node became a BaseNode
    assert list(node.state_dict()) == ["v_threshold", "spike_value", "psi", "psi_da", "_extra_state"]
    # BaseNode settings the closed form has no place for are fixed, and say so
    assert node.v_reset is None and node.surrogate_function is None and node.detach_reset is False
    assert node.store_v_seq is False and node.v_seq is None
    with pytest.raises(ValueError, match="no per-step membrane potential"):
        node.store_v_seq = True
    assert node.v is None and node.store_v is False
    with pytest.raises(TypeError, match="store_v must be a bool"):
        node.store_v = 1
    assert list(node.children()) == []  # no surrogate module in the tree (save allowlist, graph checks)


def test_output_monitor_for_base_node_records_every_neuron_of_a_converted_resnet(resnet):
    snn, sites = resnet
    nodes = _nodes(snn)
    assert len(nodes) == sites == 19
    mon = monitor.OutputMonitor(snn, neuron.BaseNode)
    by_type = monitor.OutputMonitor(snn, ParallelConversionNode)
    try:
        assert mon.monitored_layers == [name for name, _ in nodes]
        with torch.no_grad():
            snn(_x())
        assert len(mon.records) == sites
        assert all(len(mon[name]) == 1 for name, _ in nodes)
        assert all(torch.equal(a, b) for a, b in zip(mon.records, by_type.records))
        assert all(r.shape[0] == T and r.shape[1] == 2 for r in mon.records)
    finally:
        mon.remove_hooks()
        by_type.remove_hooks()


# -- set_step_mode -----------------------------------------------------------------------------------
def _check_single_step_changes_nothing(net, x, y):
    before = _modes(net)
    assert before and set(before.values()) == {"m"}
    with pytest.raises(ValueError, match=r"supports only step_mode 'm'.*no module of the network was switched"):
        functional.set_step_mode(net, "s")
    assert _modes(net) == before
    with pytest.raises(ValueError, match="no module of the network was switched"):
        net.step_mode = "s"
    assert _modes(net) == before
    with torch.no_grad():
        assert torch.equal(net(x), y)  # and it still runs
    functional.set_step_mode(net, "m")
    assert _modes(net) == before
    with torch.no_grad():
        assert torch.equal(net(x), y)


def test_set_step_mode_single_step_leaves_a_converted_resnet_as_it_was(resnet, tmp_path):
    snn, _ = resnet
    x = _x()
    with torch.no_grad():
        y = snn(x)
    assert isinstance(snn, ConvertedNetwork)
    assert snn.step_mode == "m" and snn.supported_step_mode() == ("m",)
    _check_single_step_changes_nothing(snn, x, y)
    # copies, pickles and loaded files keep the check
    save_snn(snn, tmp_path / "net.pt")
    for other in (copy.deepcopy(snn), pickle.loads(pickle.dumps(snn)), load_snn(tmp_path / "net.pt")):
        assert isinstance(other, ConvertedNetwork) and type(other).__name__ == type(snn).__name__
        _check_single_step_changes_nothing(other, x, y)


class _Leaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _graph_module(*modules: nn.Module) -> ConvertedNetwork:
    root = nn.Sequential(*modules)
    return as_converted_network(fx.GraphModule(root, _Leaves().trace(root)))


def test_a_converted_network_switches_all_modules_or_none():
    # Every step module supports 's': the switch works, as set_step_mode and as an assignment.
    net = _graph_module(layer.Linear(3, 4, step_mode="m"), layer.Flatten(step_mode="m"),
                        layer.Linear(4, 2, step_mode="m"))
    assert net.supported_step_mode() == ("s", "m") and net.step_mode == "m"
    functional.set_step_mode(net, "s")
    assert set(_modes(net).values()) == {"s"}
    net.step_mode = "m"
    assert set(_modes(net).values()) == {"m"}
    assert as_converted_network(net) is net
    with pytest.raises(TypeError, match="GraphModule"):
        as_converted_network(nn.Sequential())

    class NotAStepModule(nn.Module):
        """Has a step mode outside SpikingJelly's StepModule contract: nothing can check it first."""

        def __init__(self):
            super().__init__()
            self._mode = "m"

        @property
        def step_mode(self):
            return self._mode

        @step_mode.setter
        def step_mode(self, value):
            if value != "m":
                raise ValueError("only 'm' here")
            self._mode = value

        def forward(self, x):
            return x

    mixed = _graph_module(layer.Linear(3, 4, step_mode="m"), NotAStepModule())
    with pytest.raises(ValueError, match="only 'm' here"):
        functional.set_step_mode(mixed, "s")
    assert set(_modes(mixed).values()) == {"m"}  # the Linear switched before the refusal is switched back


# -- reset_net and the membrane potential ----------------------------------------------------------------
def test_reset_net_and_attribute_monitor_on_a_converted_resnet(resnet):
    snn = copy.deepcopy(resnet[0])
    nodes = _nodes(snn)
    x = _x()
    with torch.no_grad():
        y = snn(x)
    functional.reset_net(snn)
    functional.detach_net(snn)
    # v is absent (None) until stored, and a monitor reads it without raising
    after = monitor.AttributeMonitor("v", False, snn, neuron.BaseNode)
    before = monitor.AttributeMonitor("v", True, snn, neuron.BaseNode)
    try:
        with torch.no_grad():
            assert torch.equal(snn(x), y)
        assert len(after.records) == len(before.records) == len(nodes)
        assert all(v is None for v in after.records + before.records)
        after.clear_recorded_data()
        before.clear_recorded_data()
        _store_v(snn, True)
        inputs = monitor.InputMonitor(snn, ParallelConversionNode, function_on_input=lambda t: t.clone())
        spikes = monitor.OutputMonitor(snn, ParallelConversionNode)
        with torch.no_grad():
            assert torch.equal(snn(x), y)  # storing v changes no spike
        assert all(v is None for v in before.records)  # read before the first forward stored one
        for (name, node), v, cur, out in zip(nodes, after.records, inputs.records, spikes.records):
            assert v is node.v and v.shape == out.shape[1:] and v.dtype == out.dtype, name
            assert torch.equal(v, node.residual_potential(cur)), name
            k = (out != 0).sum(0)
            theta = node.v_threshold.view(-1, 1, 1)
            inner = (k > 0) & (k < T)
            assert bool(((v >= 0) & (v < theta * (1 + 1e-6)))[inner].all()), name
        inputs.remove_hooks()
        spikes.remove_hooks()
    finally:
        after.remove_hooks()
        before.remove_hooks()
    # reset_net makes v absent again; nothing carried over between calls
    functional.reset_net(snn)
    assert all(m.v is None for _, m in nodes)
    with torch.no_grad():
        assert torch.equal(snn(x), y)
    assert all(m.v is not None for _, m in nodes)


def _if_reference(m, T_out, theta, shift, bias):
    """A step-by-step integrate-and-fire neuron (soft reset, initial potential ``shift``) driven
    by the constant current ``m + bias``: spike count and final potential."""
    v = shift + torch.zeros_like(m)
    k = torch.zeros_like(m)
    for _ in range(T_out):
        v = v + (m + bias)
        fired = (v >= theta).to(m.dtype)
        k = k + fired
        v = v - fired * theta
    return k, v


@pytest.mark.parametrize("order", ["late", "early"])
@pytest.mark.parametrize("inplace", [False, True])
def test_v_is_the_potential_of_a_step_by_step_if_neuron(order, inplace):
    T_out, T_in, C = 8, 3, 4
    g = torch.Generator().manual_seed(7)
    theta = torch.rand(C, generator=g, dtype=F64) + 0.5
    shift = torch.rand(C, generator=g, dtype=F64) * theta  # 0 <= shift < theta, where the two agree
    bias = (torch.rand(C, generator=g, dtype=F64) - 0.5) * 0.2
    node = ParallelConversionNode(T_out, v_threshold=theta, psi=shift, psi_da=bias, spike_order=order,
                                  inplace=inplace).to(F64)
    node.store_v = True
    # time-varying currents whose means span silent, graded and saturated neurons
    x = (torch.rand(T_in, 64, C, 5, generator=g, dtype=F64) * 2 - 0.5) * theta.view(1, 1, C, 1) * 1.6
    m = x.mean(0)
    with torch.no_grad():
        out = node(x.clone())
    c = (1, C, 1)
    k_if, v_if = _if_reference(m, T_out, theta.view(c), shift.view(c), bias.view(c))
    assert torch.equal((out != 0).sum(0).to(F64), k_if)
    torch.testing.assert_close(node.v, v_if, rtol=0, atol=1e-12)
    assert bool((k_if == 0).any() and (k_if == T_out).any() and ((k_if > 0) & (k_if < T_out)).any())
    graded = (m + bias.view(c) >= 0) & (m + bias.view(c) <= theta.view(c))
    assert bool(((node.v >= 0) & (node.v < theta.view(c)))[graded].all())


def test_v_equals_spikingjellys_if_node():
    # SpikingJelly's IFNode (soft reset, v starts at 0): a first step of m + bias + shift puts its
    # potential where the parallel neuron's starts, then m + bias at every step.
    T_out, theta, shift, bias = 6, 1.25, 0.4, 0.05
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 100, generator=g, dtype=F64) * 2 - 0.4) * theta
    node = ParallelConversionNode(T_out, v_threshold=theta, psi=shift, psi_da=bias).to(F64)
    node.store_v = True
    with torch.no_grad():
        out = node(x)
    m = x.mean(0)
    drive = (m + node.psi_da).unsqueeze(0).repeat(T_out, 1)
    drive[0] += node.psi
    if_node = neuron.IFNode(v_threshold=float(node.v_threshold), v_reset=None, step_mode="m")
    with torch.no_grad():
        if_spikes = if_node(drive)
    assert torch.equal((out != 0).sum(0), (if_spikes != 0).sum(0))
    torch.testing.assert_close(node.v, if_node.v, rtol=0, atol=1e-12)


def test_explicit_state_forward():
    node = ParallelConversionNode(T, v_threshold=torch.tensor([0.5, 1.0, 2.0]), psi_da=0.1)
    x = torch.randn(3, 5, 3)
    f = base.to_functional_forward(node)
    (out,), (v,) = f((x,), (None,))
    assert torch.equal(out, node(x)) and v is None
    node.store_v = True
    (out,), (v,) = f((x,), (None,))
    assert node.v is None  # the explicit form leaves the module's own state alone
    node(x)
    assert torch.equal(v, node.v)
    with pytest.raises(ValueError, match="supports only step_mode 'm'"):
        node.single_step_functional_forward((x[0],), (None,))


def test_neuromorphic_memory_access_counter_finds_the_nodes():
    net = nn.Sequential(layer.Linear(6, 8, step_mode="m"), ParallelConversionNode(T),
                        layer.Linear(8, 3, step_mode="m"), ParallelConversionNode(T))
    x = torch.randn(T, 5, 6)
    for store in (False, True):
        _store_v(net, store)
        counter = op_counter.NeuromorphicMemoryAccessCounter()
        with torch.no_grad(), op_counter.ModuleCounterMode([counter], model=net):
            net(x)
        counts = counter.get_counts()
        # the counter's BaseNode rule runs on both nodes: state traffic is that of v, when stored
        for i, width in ((1, 8), (3, 3)):
            scope = next(s for s in counts if s.endswith(f".{i}"))
            assert counts[scope]["neuron_state_read_bytes"] == (T * 5 * width * 4 if store else 0)
