"""ParallelConversionNode as a SpikingJelly neuron: lossless two-layer conversion, input and
parameter validation, and integration with SpikingJelly's functional/monitor tooling."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, monitor

from sj_parallel_conversion import QCFS, ParallelConversionNode

F64 = torch.float64


def _t(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


# -- 4. two-layer network: QCFS ANN vs parallel SNN at T == L ---------------------------------
@pytest.mark.parametrize("L", [4, 8, 16])
def test_two_layer_network_lossless(L):
    torch.manual_seed(L)
    d0, d1, d2, classes, N = 20, 48, 32, 10, 512
    theta1, theta2 = 1.5, 1.2
    ann = nn.Sequential(
        nn.Linear(d0, d1), QCFS(L, theta=_t(theta1)),
        nn.Linear(d1, d2), QCFS(L, theta=_t(theta2)),
        nn.Linear(d2, classes),
    ).to(F64)
    with torch.no_grad():
        ann[0].weight.normal_(0, 1.0 / d0 ** 0.5)
        ann[0].bias.normal_(0, 0.5)
        ann[2].weight.normal_(0, 2.0 / d1 ** 0.5)
        ann[2].bias.normal_(0, 0.3)
        ann[4].weight.normal_(0, 1.0)
    x = torch.randn(N, d0, dtype=F64)

    lin = [layer.Linear(m.in_features, m.out_features, step_mode="m").to(F64) for m in ann[::2]]
    for dst, src in zip(lin, ann[::2]):
        dst.load_state_dict(src.state_dict())
    n1 = ParallelConversionNode(L, v_threshold=_t(theta1), psi=_t(theta1 / 2))
    n2 = ParallelConversionNode(L, v_threshold=_t(theta2), psi=_t(theta2 / 2))
    snn = nn.Sequential(lin[0], n1, lin[1], n2, lin[2])

    with torch.no_grad():
        z1 = ann[0](x)
        q1 = ann[1](z1)
        q2 = ann[3](ann[2](q1))
        y_ann = ann[4](q2)

        x_seq = x.unsqueeze(0).repeat(L, 1, 1)
        s1 = n1(lin[0](x_seq))
        s2 = n2(lin[1](s1))
        y_seq = lin[2](s2)
        y_snn = y_seq.mean(0)
        functional.reset_net(snn)
        assert torch.equal(snn(x_seq), y_seq)

    # Hidden counts: integer equal to the QCFS levels (q * L / theta).
    lev1 = torch.round(q1 * L / theta1).to(torch.int64)
    lev2 = torch.round(q2 * L / theta2).to(torch.int64)
    k1 = torch.round(s1.sum(0) / theta1).to(torch.int64)
    k2 = torch.round(s2.sum(0) / theta2).to(torch.int64)
    # The activations are not trivial: many neurons strictly between silent and saturated.
    for lev in (lev1, lev2):
        assert ((lev > 0) & (lev < L)).float().mean() > 0.15
        assert len(lev.unique()) == L + 1  # every level 0..L occurs
    assert torch.equal(k1, lev1)
    assert torch.equal(k2, lev2)
    assert torch.equal(y_snn.argmax(1), y_ann.argmax(1))
    torch.testing.assert_close(y_snn, y_ann, rtol=0, atol=1e-10)

    # The same through seq_to_ann_forward with plain nn.Linear.
    with torch.no_grad():
        h = n1(functional.seq_to_ann_forward(x_seq, ann[0]))
        h = n2(functional.seq_to_ann_forward(h, ann[2]))
        y2 = functional.seq_to_ann_forward(h, ann[4]).mean(0)
    assert torch.equal(y2.argmax(1), y_ann.argmax(1))


def test_defaults_shift_half_threshold_and_spike_value_threshold():
    # T=4, theta=2: default psi = 1, spike value 2. m=1.2 -> floor((4.8 + 1)/2) = 2 spikes.
    node = ParallelConversionNode(4, v_threshold=_t(2.0))
    assert node.psi.item() == 1.0 and node.spike_value.item() == 2.0 and node.psi_da.item() == 0.0
    assert node(_t([[1.2], [1.2]]))[:, 0].tolist() == [0.0, 0.0, 2.0, 2.0]
    # per-channel threshold: the defaults follow channel by channel
    node = ParallelConversionNode(4, v_threshold=_t([1.0, 2.0]))
    assert node.psi.tolist() == [0.5, 1.0] and node.spike_value.tolist() == [1.0, 2.0]


# -- 5. bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0, -3, 2.0, 1.5, "4", True, None])
def test_bad_T(T):
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        ParallelConversionNode(T)


@pytest.mark.parametrize("name", ["v_threshold", "spike_value"])
@pytest.mark.parametrize("value,msg", [
    (0.0, "must be positive"), (-1.0, "must be positive"),
    (float("nan"), "must be finite"), (float("inf"), "must be finite"),
    (torch.tensor([1.0, 0.0]), "must be positive"), (torch.tensor([1.0, float("nan")]), "must be finite"),
])
def test_bad_thresholds(name, value, msg):
    with pytest.raises(ValueError, match=msg):
        ParallelConversionNode(4, **{name: value})


@pytest.mark.parametrize("name", ["psi", "psi_da"])
def test_psi_and_psi_da_must_be_finite(name):
    with pytest.raises(ValueError, match="must be finite"):
        ParallelConversionNode(4, **{name: float("inf")})
    with pytest.raises(ValueError, match="must be finite"):
        ParallelConversionNode(4, **{name: torch.tensor([0.0, float("nan")])})
    ParallelConversionNode(4, **{name: -0.5})  # negative shifts/biases are legal


def test_parameter_shape_errors():
    with pytest.raises(ValueError, match="scalar or a 1-D per-channel tensor"):
        ParallelConversionNode(4, v_threshold=torch.ones(2, 3))
    with pytest.raises(ValueError, match="must not be empty"):
        ParallelConversionNode(4, psi_da=torch.ones(0))
    with pytest.raises(ValueError, match="disagree on the channel count"):
        ParallelConversionNode(4, v_threshold=torch.ones(3), psi_da=torch.zeros(4))
    with pytest.raises(ValueError, match="disagree on the channel count"):
        ParallelConversionNode(4, spike_value=torch.ones(2), psi=torch.zeros(5))
    with pytest.raises(TypeError, match="float or a 1-D tensor"):
        ParallelConversionNode(4, v_threshold="1.0")
    with pytest.raises(ValueError, match="backend must be one of"):
        ParallelConversionNode(4, backend="triton")
    with pytest.raises(ValueError, match="spike_order must be"):
        ParallelConversionNode(4, spike_order="middle")


def test_per_channel_length_must_match_input():
    node = ParallelConversionNode(4, v_threshold=torch.ones(3))
    with pytest.raises(ValueError, match="3 per-channel parameters but the input has 4 channels"):
        node(torch.randn(2, 5, 4, 6))
    node(torch.randn(2, 5, 3, 6))  # fine
    node_last = ParallelConversionNode(4, v_threshold=torch.ones(3), channel_dim=-1)
    with pytest.raises(ValueError, match="3 per-channel parameters but the input has 6 channels"):
        node_last(torch.randn(2, 5, 3, 6))
    with pytest.raises(ValueError, match="out of range"):
        ParallelConversionNode(4, v_threshold=torch.ones(3), channel_dim=3)(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="3 per-channel parameters"):
        node.count(torch.randn(5, 4))


def test_bad_inputs():
    node = ParallelConversionNode(4)
    with pytest.raises(ValueError, match=r"expects input of shape \[T_in, N, ...\]"):
        node(torch.randn(7))
    with pytest.raises(ValueError, match=r"expects input of shape \[T_in, N, ...\]"):
        node(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        node(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        node(torch.ones(2, 3, dtype=torch.bool))
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    checked = ParallelConversionNode(4, check_nan=True)
    with pytest.raises(ValueError, match="NaN input currents"):
        checked(x)
    with pytest.raises(ValueError, match="NaN input currents"):
        checked.count(torch.tensor([0.0, float("nan")]))
    # Unchecked (the default, no host synchronisation): the NaN neuron is silent, the others fire.
    out = node(x)
    assert torch.equal(out[:, 2], torch.zeros(4))
    assert torch.equal(out[:, [0, 1, 3]], checked(x[:, [0, 1, 3]]))
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        ParallelConversionNode(4, backend="cupy")(torch.randn(2, 3))
    node_bad = ParallelConversionNode(4)
    node_bad.backend = "opencl"  # an unknown backend set after construction is caught at dispatch
    with pytest.raises(ValueError, match="backend must be one of"):
        node_bad(torch.randn(2, 3))


def test_single_step_mode_is_refused():
    assert ParallelConversionNode(4).supported_step_mode() == ("m",)
    with pytest.raises(ValueError, match="supports only step_mode 'm'.*count_domain_model"):
        ParallelConversionNode(4, step_mode="s")
    net = nn.Sequential(layer.Linear(5, 5), ParallelConversionNode(4))
    with pytest.raises(ValueError, match="supports only step_mode 'm'"):
        functional.set_step_mode(net, "s")
    node = ParallelConversionNode(4)
    with pytest.raises(ValueError, match="supports only step_mode 'm'"):
        node.step_mode = "s"
    assert node.step_mode == "m"


def test_infinite_currents_saturate():
    # +inf current: ((inf + bias) * T + psi) / theta = +inf, clipped to T -> a spike every step.
    # -inf current: -inf clipped to 0 -> silent. A train mixing +inf and -inf has no time mean:
    # that is an error, not a silent zero.
    T = 5
    node = ParallelConversionNode(T, v_threshold=0.7, psi_da=0.2, check_nan=True)
    x = torch.tensor([[float("inf"), float("-inf"), 0.3]])
    out = node(x)
    assert out[:, 0].tolist() == [pytest.approx(0.7)] * T
    assert out[:, 1].tolist() == [0.0] * T
    x2 = torch.tensor([[float("inf"), float("-inf")], [1.0, 2.0], [-3.0, 5.0]])
    k = (node(x2) != 0).sum(0)
    assert k.tolist() == [T, 0]
    mixed = torch.tensor([[float("inf")], [float("-inf")]])
    with pytest.raises(ValueError, match=r"\+inf and -inf"):
        node(mixed)


# -- 6. SpikingJelly integration ------------------------------------------------------------------
def _net(T=4):
    return nn.Sequential(
        layer.Linear(6, 8, step_mode="m"),
        ParallelConversionNode(T, v_threshold=torch.linspace(0.5, 1.5, 8)),
        layer.Linear(8, 3, step_mode="m"),
        ParallelConversionNode(T, v_threshold=0.8),
    )


def test_set_step_mode():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(4, 10, 6)
    with torch.no_grad():
        y1 = net(x)
    assert y1.shape == (4, 10, 3) and y1.abs().sum() > 0
    with pytest.raises(ValueError, match="supports only step_mode 'm'"):
        functional.set_step_mode(net, "s")
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        assert torch.equal(net(x), y1)


def test_state_dict_round_trip_per_channel():
    C, T = 5, 6
    g = torch.Generator().manual_seed(3)
    src = ParallelConversionNode(
        T, v_threshold=torch.rand(C, generator=g) + 0.5, spike_value=torch.rand(C, generator=g) + 0.5,
        psi=torch.rand(C, generator=g), psi_da=torch.rand(C, generator=g) - 0.5)
    sd = src.state_dict()
    assert set(sd) >= {"v_threshold", "spike_value", "psi", "psi_da"}
    dst = ParallelConversionNode(T)  # scalar buffers: they adopt the saved per-channel shapes
    dst.load_state_dict(sd)
    for name in ("v_threshold", "spike_value", "psi", "psi_da"):
        assert torch.equal(getattr(dst, name), getattr(src, name))
    x = torch.randn(3, 7, C, 2, generator=g)
    assert torch.equal(dst(x), src(x))
    # inside a container, under a prefix
    net_src, net_dst = nn.Sequential(nn.Identity(), src), nn.Sequential(nn.Identity(), ParallelConversionNode(T))
    net_dst.load_state_dict(net_src.state_dict())
    assert torch.equal(net_dst(x), net_src(x))
    # a 2-D saved buffer is an error
    bad = dict(sd)
    bad["psi_da"] = torch.zeros(2, C)
    with pytest.raises(RuntimeError, match="expected a scalar or 1-D tensor"):
        ParallelConversionNode(T).load_state_dict(bad)


def test_state_saved_under_the_earlier_names_loads():
    """States written before the buffers were named psi and psi_da held them as shift and bias."""
    C, T = 3, 4
    src = ParallelConversionNode(T, v_threshold=torch.full((C,), 0.8), psi=torch.full((C,), 0.3),
                                 psi_da=torch.full((C,), -0.1))
    old = {{"psi": "0.shift", "psi_da": "0.bias"}.get(k[2:], k): v
           for k, v in nn.Sequential(src).state_dict().items()}
    assert "0.shift" in old and "0.bias" in old
    dst = nn.Sequential(ParallelConversionNode(T))
    dst.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    assert torch.equal(dst[0].psi, src.psi) and torch.equal(dst[0].psi_da, src.psi_da)


def test_to_float64():
    node = ParallelConversionNode(4, v_threshold=0.3, psi=0.1).to(F64)
    assert node.v_threshold.dtype == F64 and node.psi.dtype == F64
    m = _t([[0.05, 0.125, 0.2, 0.5]])
    out = node(m)
    assert out.dtype == F64
    # v_threshold=0.3 was stored as float32 first: compare with the float64 value it now holds.
    th, psi = node.v_threshold.item(), node.psi.item()
    k = torch.clamp(torch.floor((m[0] * 4 + psi) / th), 0, 4)
    assert torch.equal((out != 0).sum(0).to(F64), k)
    assert torch.equal(out.sum(0), k * th)


def _compile_works() -> str | None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler for torch.compile's inductor backend"
    return None


@pytest.mark.slow  # compiles with inductor
@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_torch_compile_matches_eager():
    # Takes about 10-25 s on a 2-core CPU box (inductor compiles C++). The default node (no NaN
    # check) is one operator call, so the whole forward is one graph.
    torch._dynamo.reset()
    node = ParallelConversionNode(6, v_threshold=torch.tensor([0.5, 1.0, 2.0]), psi_da=0.1)
    x = torch.randn(4, 8, 3, 5)
    compiled = torch.compile(node, fullgraph=True)
    y = compiled(x)
    assert torch.equal(y, node(x))
    x2 = torch.randn(4, 8, 3, 5) * 3
    assert torch.equal(compiled(x2), node(x2))


def test_output_monitor_records():
    torch.manual_seed(1)
    net = _net()
    x = torch.randn(4, 10, 6)
    with torch.no_grad():
        h = net[1](net[0](x))
    mon = monitor.OutputMonitor(net, ParallelConversionNode)
    with torch.no_grad():
        y = net(x)
    assert len(mon.records) == 2
    assert torch.equal(mon.records[0], h)
    assert torch.equal(mon.records[1], y)
    mon.remove_hooks()


def test_backward_raises():
    node = ParallelConversionNode(4)
    x = torch.randn(3, 5, requires_grad=True)
    y = node(x)
    assert y.requires_grad  # the graph is built so that backward can refuse loudly
    with pytest.raises(RuntimeError, match="inference-only"):
        y.sum().backward()
    # through a trainable layer in front of it, too
    lin = layer.Linear(5, 5, step_mode="m")
    y = node(lin(torch.randn(3, 2, 5)))
    with pytest.raises(RuntimeError, match="inference-only"):
        y.mean().backward()
    # no graph, no error, under no_grad
    with torch.no_grad():
        node(x)


def test_deepcopy_and_repr():
    node = ParallelConversionNode(4, v_threshold=torch.ones(3))
    node2 = copy.deepcopy(node)
    x = torch.randn(2, 4, 3)
    assert torch.equal(node(x), node2(x))
    assert "T=4" in repr(node) and "[3 channels]" in repr(node)


def test_blocked_time_mean_adds_in_the_canonical_order():
    # Above BLOCK elements per step the torch backend sums block by block (cache reuse); every
    # element must still see the same additions in the same order as the step-by-step sum.
    from sj_parallel_conversion.kernels import torch_backend

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, torch_backend.BLOCK // 2 + 5, 2, generator=g) * 1e3
    step_by_step = x[0].clone()
    for t in range(1, 7):
        step_by_step += x[t]
    want = step_by_step / 7
    assert torch.equal(torch_backend.time_mean(x), want)
    # permuted dense steps (blocked in memory order) and a non-dense view (step by step)
    assert torch_backend.flat_steps(x.transpose(2, 3)) is not None
    assert torch.equal(torch_backend.time_mean(x.transpose(2, 3)), want.transpose(1, 2))
    assert torch_backend.flat_steps(x[:, :, ::2]) is None
    assert torch.equal(torch_backend.time_mean(x[:, :, ::2]), want[:, ::2])


@pytest.mark.parametrize("order", ["late", "early"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_blocked_spike_trains_equal_the_per_step_definition(order, layout):
    # Above BLOCK neurons spikes_from_count writes dense CPU trains block by block (one pass over
    # the output); each step must still read spike_value where the train fires and 0 elsewhere,
    # as the step-by-step definition says (a NaN count never fires).
    from sj_parallel_conversion import formulas

    T = 5
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, T + 1, (2, 4, formulas.BLOCK // 8 + 3, 3), generator=g).float()
    k[0, 1, 2, 0] = float("nan")
    if layout == "channels_last":
        k = k.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        k = k[:, :, ::2]  # not dense: the broadcast form
    sv = (torch.rand(4, generator=g) + 0.5).view(1, 4, 1, 1)
    out = formulas.spikes_from_count(k, T, sv, order)
    # every step keeps the count's layout (the next convolution's fast path)
    assert out[0].stride() == formulas.step_strides(k, 1)[1:]
    for t in range(T):
        fires = (t >= T - k) if order == "late" else (t < k)
        assert torch.equal(out[t], torch.where(fires, sv.expand_as(k), torch.zeros(())))


def _node_like(cls):
    from sj_parallel_conversion import QCFS, ClipReLU, DAQCFS

    return {"node": lambda: ParallelConversionNode(4, v_threshold=torch.tensor([1.0, 2.0])),
            "QCFS": lambda: QCFS(4, 2.0), "ClipReLU": lambda: ClipReLU(torch.tensor([1.0, 2.0])),
            "DAQCFS": lambda: DAQCFS(4, torch.tensor([1.0, 2.0]))}[cls]()


@pytest.mark.parametrize("cls,name,value,rule", [
    ("node", "v_threshold", float("nan"), "finite"), ("node", "v_threshold", 0.0, "positive"),
    ("node", "v_threshold", -1.0, "positive"), ("node", "v_threshold", float("inf"), "finite"),
    ("node", "spike_value", float("nan"), "finite"), ("node", "spike_value", 0.0, "positive"),
    ("node", "psi", float("inf"), "finite"), ("node", "psi_da", float("nan"), "finite"),
    ("QCFS", "theta", 0.0, "positive"), ("ClipReLU", "theta", -2.0, "positive"),
    ("DAQCFS", "theta", float("nan"), "finite"), ("DAQCFS", "psi_da", float("-inf"), "finite"),
    ("DAQCFS", "phi_da", float("nan"), "finite"),
])
def test_loading_a_state_checks_what_the_constructor_checks(cls, name, value, rule):
    """One rule (neuron.check_parameter) for the constructor and load_state_dict: a state with a
    NaN, zero, negative or infinite threshold is refused, naming the module and the parameter."""
    state = _node_like(cls).state_dict()
    bad = state[name].clone()
    bad.reshape(-1)[-1] = value
    state[name] = bad
    target = _node_like(cls)
    before = getattr(target, name).clone()
    with pytest.raises(RuntimeError, match=rf"module '<root>' \(\w+\): {name} must be {rule}, got"):
        target.load_state_dict(state)
    assert torch.equal(getattr(target, name), before)
    wrapped = torch.nn.Sequential(torch.nn.Identity(), _node_like(cls))
    with pytest.raises(RuntimeError, match=rf"module '1' \(\w+\): {name} must be {rule}"):
        wrapped.load_state_dict({f"1.{k}": v for k, v in state.items()})
