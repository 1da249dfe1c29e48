"""Memory reuse: neurons writing spikes over their input currents, residual sums accumulating into
a temporary; the same bits as without reuse, and only where the graph shows nobody else reads."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import monitor

from sj_parallel_conversion import (NetworkSettings, ParallelConversionNode, ParallelConverter, count_domain_model,
                                    kernels)
from sj_parallel_conversion.kernels import native_backend
from sj_parallel_conversion.tools.models import build_model
from sj_parallel_conversion.reuse import accumulate, reuse_memory

BACKENDS = ["torch"] + (["native"] if native_backend.compiler() is not None else [])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def _node(T, C, dtype, backend, order, inplace, channel_dim=1):
    g = torch.Generator().manual_seed(C)
    theta = (torch.rand(C, generator=g) + 0.25).to(dtype)
    return ParallelConversionNode(T, v_threshold=theta, psi=(torch.rand(C, generator=g) * 0.5).to(dtype),
                                  psi_da=(torch.randn(C, generator=g) * 0.1).to(dtype), channel_dim=channel_dim,
                                  backend=backend, spike_order=order, inplace=inplace)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["late", "early"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "time_inner"])
def test_in_place_neuron_gives_the_out_of_place_bits_in_the_input(backend, dtype, order, layout):
    T, C = 7, 5
    x = (torch.randn(T, 3, C, 4, 6) * 1.5).to(dtype)
    x[:, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    if layout == "channels_last":  # every step channels-last, steps outermost: the native kernel's own layout
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    elif layout == "time_inner":  # time varies fastest: the in-place path copies the result back
        x = x.permute(1, 2, 3, 4, 0).contiguous().permute(4, 0, 1, 2, 3)
    ref = _node(T, C, dtype, backend, order, inplace=False)(x.clone())
    y = x.clone()
    with torch.no_grad():
        out = _node(T, C, dtype, backend, order, inplace=True)(y)
    # In place only where the native kernel writes the spikes in its own pass; elsewhere the
    # backend would compute a new tensor and copy it back, so the node leaves the input alone.
    one_pass = backend == "native" and layout != "time_inner"
    assert (out is y) == one_pass
    if not one_pass:
        assert torch.equal(_bits(y), _bits(x))
    assert torch.equal(_bits(out), _bits(ref))
    # the operator itself always writes in place, on every backend and layout
    node = _node(T, C, dtype, backend, order, inplace=False)
    z = x.clone()
    with torch.no_grad():
        got = kernels.fire(z, T, node.v_threshold, node.psi, node.psi_da, node.spike_value, order=order,
                           backend=backend, inplace=True)
    assert got is z and torch.equal(_bits(z), _bits(ref))


def test_in_place_neuron_keeps_inputs_it_cannot_overwrite():
    node = _node(6, 4, torch.float32, "auto", "late", inplace=True)
    short = torch.randn(1, 2, 4, 3, 3)  # T_in != T: the output is larger than the input
    keep = short.clone()
    out = node(short)
    assert out.shape[0] == 6 and torch.equal(short, keep)
    # an input that needs a gradient is not overwritten (the operator's backward then raises)
    leaf = torch.randn(6, 2, 4, 3, 3, requires_grad=True)
    keep = leaf.detach().clone()
    out = node(leaf)
    assert out is not leaf and torch.equal(leaf.detach(), keep)
    # the same node out of place, and under torch.no_grad in place
    with torch.no_grad():
        ref = _node(6, 4, torch.float32, "auto", "late", inplace=False)(keep)
        assert torch.equal(node(keep.clone()), ref)


def test_in_place_fire_refuses_an_input_whose_elements_share_memory():
    node = _node(4, 3, torch.float32, "auto", "late", inplace=True)
    x = torch.randn(1, 2, 3, 5).expand(4, 2, 3, 5)  # one step seen four times
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        kernels.fire(x, 4, node.v_threshold, node.psi, node.psi_da, node.spike_value, inplace=True)
    with torch.no_grad():  # the node does not try: it writes a new tensor
        assert torch.equal(node(x), _node(4, 3, torch.float32, "auto", "late", inplace=False)(x))


def test_fire_inplace_checks_its_arguments():
    params = [torch.tensor(v) for v in (1.0, 0.5, 0.0, 1.0)]
    with pytest.raises(ValueError, match="T_in == T"):
        kernels.fire(torch.randn(2, 3), 4, *params, inplace=True)
    with pytest.raises(ValueError, match="T_in == T"):
        kernels.fire_inplace_op(torch.randn(2, 3), 4, *params, 1, True)
    with pytest.raises(ValueError, match="requires grad"):
        kernels.fire(torch.randn(4, 3, requires_grad=True), 4, *params, inplace=True)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        ParallelConversionNode(4, inplace=1)
    if native_backend.compiler() is not None:
        with pytest.raises(ValueError, match="dense steps"):
            native_backend.fire(torch.randn(3, 4, 2).transpose(0, 2), 2, params, 1, True, inplace=True)


def test_accumulate_writes_into_its_first_operand_only_when_the_sum_fits():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    want = a + b
    out = accumulate(a, b)
    assert out is a and torch.equal(out, want)
    # broadcast to a larger shape (a one-step operand and a T-step one): a new tensor, a unchanged
    a, b = torch.randn(1, 3), torch.randn(4, 3)
    keep = a.clone()
    out = accumulate(a, b)
    assert out.shape == (4, 3) and torch.equal(a, keep) and torch.equal(out, keep + b)
    # a wider dtype: a new float64 tensor, as a + b
    a, b = torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)
    keep = a.clone()
    out = accumulate(a, b)
    assert out.dtype == torch.float64 and torch.equal(a, keep) and torch.equal(out, keep + b)
    # a gradient to keep: a new tensor
    a, b = torch.randn(2, 3), torch.randn(2, 3, requires_grad=True)
    keep = a.clone()
    out = accumulate(a, b)
    assert torch.equal(a, keep) and out.requires_grad
    # a Python number
    a = torch.ones(3)
    assert accumulate(a, 2) is a and torch.equal(a, torch.full((3,), 3.0))


class Shared(nn.Module):
    """u feeds a neuron and the residual sum; the sum feeds a neuron and the head."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 4, 3, padding=1)
        self.a0 = nn.ReLU()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.a1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.a2 = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        u = self.c1(self.a0(self.c0(x)))
        z = self.c2(self.a1(u)) + u  # c2's output is the sum's alone, u is read twice
        return self.fc(self.a2(z).flatten(1)) + z.flatten(1)[:, :3]


def _convert(ann, T, inplace, x):
    return ParallelConverter("parallel", T=T, dataloader=[x], progress=False, method="ema",
                             network=NetworkSettings(inplace=inplace)).convert(copy.deepcopy(ann))


def test_reuse_only_where_the_graph_shows_a_sole_reader():
    torch.manual_seed(0)
    ann, x = Shared().eval(), torch.randn(8, 3, 8, 8)
    snn = _convert(ann, 4, True, x)
    sums = [n for n in snn.graph.nodes if n.target is accumulate]
    # into c2's output and fc's, never into u or into the sum z, which have other readers
    assert sorted(n.args[0].target for n in sums) == ["c2", "fc"]
    # a0 alone reads c0's output; a1 reads u, which the sum reads too; a2 reads z, as the head does
    assert [m.inplace for m in snn.modules() if isinstance(m, ParallelConversionNode)] == [True, False, False]
    plain = _convert(ann, 4, False, x)
    assert not any(n.target is accumulate for n in plain.graph.nodes)
    xs = x.unsqueeze(0).repeat(4, 1, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(snn(xs.clone()), plain(xs.clone()))
        # forcing the neurons in place would corrupt what the others read (so the check can fail)
        for m in snn.modules():
            if isinstance(m, ParallelConversionNode):
                m.inplace = True
        assert not torch.equal(snn(xs.clone()), plain(xs.clone()))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_converted_resnet_with_reuse_gives_the_same_bits_spikes_and_monitors(shortcut):
    torch.manual_seed(0)
    ann = build_model("resnet20", num_classes=10, act="relu", shortcut=shortcut).eval()
    calib = torch.randn(16, 3, 32, 32)
    snn, plain = _convert(ann, 6, True, calib), _convert(ann, 6, False, calib)
    nodes = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    assert all(m.inplace for m in nodes) and not any(
        m.inplace for m in plain.modules() if isinstance(m, ParallelConversionNode))
    assert sum(n.target is accumulate for n in snn.graph.nodes) == 9  # one per residual block
    x = torch.randn(3, 3, 32, 32)
    for steps in (x.unsqueeze(0), x.unsqueeze(0).repeat(6, 1, 1, 1, 1)):
        feed = steps.clone()
        mon, mon_plain = (monitor.OutputMonitor(net, ParallelConversionNode) for net in (snn, plain))
        with torch.no_grad():
            y, y_plain = snn(feed), plain(steps.clone())
        assert torch.equal(feed, steps)  # the caller's input is never overwritten
        assert torch.equal(y, y_plain)
        # spikes are never overwritten: a monitor of the neurons records the same trains
        assert len(mon.records) == len(nodes) and all(
            torch.equal(a, b) for a, b in zip(mon.records, mon_plain.records))
        mon.remove_hooks()
        mon_plain.remove_hooks()
    with torch.no_grad():
        assert torch.equal(count_domain_model(snn)(x), count_domain_model(plain)(x))


def test_reuse_memory_is_idempotent_and_keeps_the_outputs():
    torch.manual_seed(1)
    ann, x = Shared().eval(), torch.randn(8, 3, 8, 8)
    plain = _convert(ann, 4, False, x)
    again = reuse_memory(reuse_memory(copy.deepcopy(plain)))
    assert sum(n.target is accumulate for n in again.graph.nodes) == 2
    xs = x.unsqueeze(0).repeat(4, 1, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(again(xs.clone()), plain(xs.clone()))


def test_recipe_option_is_checked():
    with pytest.raises(TypeError, match="inplace must be True or False"):
        ParallelConverter("parallel", T=4, dataloader=[torch.randn(2, 3)], network=NetworkSettings(inplace="yes"))


def test_input_monitor_records_currents_when_it_clones_them():
    # The documented way to watch a reusing network's currents: record clones before the neuron runs.
    torch.manual_seed(3)
    ann, x = build_model("resnet20", num_classes=10, act="relu", shortcut="B").eval(), torch.randn(2, 3, 32, 32)
    snn, plain = _convert(ann, 4, True, x), _convert(ann, 4, False, x)
    mon = monitor.InputMonitor(snn, ParallelConversionNode, function_on_input=lambda t: t.clone())
    by_ref = monitor.InputMonitor(snn, ParallelConversionNode)
    mon_plain = monitor.InputMonitor(plain, ParallelConversionNode)
    with torch.no_grad():
        snn(x.unsqueeze(0))
        plain(x.unsqueeze(0))
    assert len(mon.records) == 19 and all(torch.equal(a, b) for a, b in zip(mon.records, mon_plain.records))
    # references to the reused inputs hold spikes afterwards: what the docs warn about
    assert not all(torch.equal(a, b) for a, b in zip(by_ref.records, mon_plain.records))


def test_reusing_network_compiles_in_one_graph():
    # accumulate must trace under torch.compile(fullgraph=True), at spike level and in the count domain
    torch._dynamo.reset()
    torch.manual_seed(2)
    ann, x = Shared().eval(), torch.randn(4, 3, 8, 8)
    snn, plain = _convert(ann, 4, True, x), _convert(ann, 4, False, x)
    assert any(n.target is accumulate for n in snn.graph.nodes)
    xs = x.unsqueeze(0).repeat(4, 1, 1, 1, 1)
    with torch.no_grad():
        compiled = torch.compile(snn, fullgraph=True, backend="aot_eager")(xs.clone())
        assert torch.equal(compiled, plain(xs.clone()))
        cm = count_domain_model(snn)
        assert torch.equal(torch.compile(cm, fullgraph=True, backend="aot_eager")(x), count_domain_model(plain)(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_neuron_bumps_the_version_autograd_checks(backend):
    # Another operation saved x for its backward: overwriting it must make backward raise (as
    # nn.ReLU(inplace=True) does), never hand that operation the spikes in place of the currents.
    w = torch.randn(4, 2, 3, requires_grad=True)
    x = torch.randn(4, 2, 3)
    loss = (w * x).sum()
    version = x._version
    node = _node(4, 3, torch.float32, backend, "late", inplace=True, channel_dim=-1)
    out = kernels.fire(x, 4, node.v_threshold, node.psi, node.psi_da, node.spike_value, channel_dim=-1,
                       backend=backend, inplace=True)
    assert out is x and x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_in_place_neuron_keeps_the_inference_only_error_for_parameters_that_require_grad():
    # A threshold or spike value that requires grad: the out-of-place operator's backward raises;
    # writing in place would instead return spikes silently cut off from that parameter.
    node = _node(4, 3, torch.float32, "auto", "late", inplace=True, channel_dim=-1)
    node.spike_value.requires_grad_(True)
    x = torch.randn(4, 2, 3)
    out = node(x)
    assert out is not x and out.requires_grad
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
    with pytest.raises(ValueError, match="nor use parameters"):
        kernels.fire(x, 4, node.v_threshold, node.psi, node.psi_da, node.spike_value, channel_dim=-1, inplace=True)
    with torch.no_grad():
        assert node(x) is x


def test_a_result_written_into_an_out_tensor_is_not_a_temporary():
    # torch.cat(..., out=buf) returns buf itself, which the graph reads again: not overwritable.
    from torch import fx

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.node = ParallelConversionNode(2, v_threshold=1.0)
            self.register_buffer("buf", torch.zeros(2, 6, 2))

        def forward(self, x, y):
            return self.node(torch.cat([x, y], dim=1, out=self.buf)) + self.buf

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, ParallelConversionNode) or super().is_leaf_module(m, name)

    net = Net()
    gm = fx.GraphModule(net, Tracer().trace(net))
    x, y = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    with torch.no_grad():
        ref = gm(x, y)
        reuse_memory(gm)
        assert not gm.node.inplace
        assert torch.equal(gm(x, y), ref)
