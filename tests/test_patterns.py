"""The pattern table (sj_parallel_conversion.patterns) is what validation, canonicalisation,
multi-step wrapping and saving do: for every module, function and method it lists, a small network
holding it either converts, runs exactly (spike level equals the count domain), saves and loads,
or is refused by validation naming it, and then saving refuses it too (issue 25)."""
from __future__ import annotations

import copy
import operator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron
from torch import fx

from sj_parallel_conversion import (QCFS, ClipReLU, DAQCFS, GraphConversionError, ParallelConverter,
                                    count_inference, load_snn, patterns, save_snn, spike_inference)
from sj_parallel_conversion.activation import activation_call
from sj_parallel_conversion.graph import prepare_graph, to_multistep
from sj_parallel_conversion.multistep import WRAPPED_TYPES
from sj_parallel_conversion.reuse import accumulate
from sj_parallel_conversion.serialization import SAVABLE_FUNCTIONS, SAVABLE_METHODS, SAVABLE_MODULES
from sj_parallel_conversion.step_modules import AnalogReLU, ChunkPart, ConstantScale, StepPad

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHAPES = {1: (3, 2, 8), 2: (3, 2, 6, 6), 3: (3, 2, 4, 4, 4)}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _dims(cls: type) -> int:
    name = cls.__name__
    return 1 if "1d" in name else 3 if "3d" in name else 2


# What to build for each module type of the table: (module, dims, how it is placed). "after": after
# a ReLU site (so a max pool reads spikes); "site": it is the activation site; "qcfs-site": a QCFS
# network (sites of one kind only).
def _module(cls: type):
    d = _dims(cls)
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return cls(4, 4, 3, padding=1), d, "after"
    if cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        return cls(4, 3, 3), d, "after"
    if cls is nn.Linear:
        return nn.Linear(8, 5), 1, "after"
    if cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        bn = cls(4).eval()
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        return bn, d, "after"
    if cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        return cls(2), d, "after"
    if cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
               nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
        return cls(3), d, "after"
    if cls is nn.Upsample:
        return nn.Upsample(scale_factor=2, mode="bilinear"), 2, "after"
    if cls is nn.Flatten:
        return nn.Flatten(1), 2, "after"
    if cls is nn.Unflatten:
        return nn.Unflatten(1, (2, 2)), 2, "after"
    if cls in (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle):
        return cls(2), 2, "after"
    if cls in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
               nn.ReplicationPad1d, nn.ReplicationPad2d):
        return cls(1), d, "after"
    if cls in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
        return cls(1, 0.5), d, "after"
    if cls in (nn.Dropout, nn.Dropout2d):
        return cls(0.2).eval(), 2, "after"
    if cls is nn.Identity:
        return nn.Identity(), 2, "after"
    if cls is ConstantScale:
        return ConstantScale(False, 2.0), 2, "after"
    if cls is ChunkPart:
        return ChunkPart(2, 1, 1), 2, "after"
    if cls is StepPad:
        return StepPad((1, 1, 1, 1), value=0.25), 2, "after"
    if cls is nn.ReLU:
        return nn.ReLU(), 2, "site"
    if cls is nn.ReLU6:
        return nn.ReLU6(), 2, "site"
    if cls is nn.Hardtanh:
        return nn.Hardtanh(0.0, 2.0), 2, "site"
    if cls is ClipReLU:
        return ClipReLU(1.5), 2, "site"
    if cls is QCFS:
        return QCFS(4, theta=2.0), 2, "qcfs-site"
    if cls is DAQCFS:
        return DAQCFS(4, theta=2.0), 2, "qcfs-site"
    if cls is nn.GroupNorm:
        return nn.GroupNorm(2, 4), 2, "after"
    if cls is nn.LayerNorm:
        return nn.LayerNorm(6), 2, "after"
    if cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        return cls(4), d, "after"
    if cls is nn.LocalResponseNorm:
        return nn.LocalResponseNorm(2), 2, "after"
    if cls is nn.Softmax:
        return nn.Softmax(dim=1), 2, "after"
    if cls is nn.PReLU:
        return nn.PReLU(), 2, "after"
    if cls is nn.MultiheadAttention:
        return None  # takes three inputs: checked by its own test below
    return cls(), 2, "after"


class Net(nn.Module):
    """conv -> [ReLU] -> module -> flatten -> linear, the module placed as ``_module`` says."""

    def __init__(self, module: nn.Module, d: int, place: str):
        super().__init__()
        self.conv = CONVS[d](2, 4, 3, padding=1)
        self.act = (nn.ReLU() if place == "after" else None)
        self.m = module
        x = torch.zeros(SHAPES[d])
        with torch.no_grad():
            k = self.features(x).flatten(1).shape[1]
        self.fc = nn.Linear(k, 3)

    def features(self, x):
        h = self.conv(x)
        if self.act is not None:
            h = self.act(h)
        return self.m(h)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _convert(ann: nn.Module, x: torch.Tensor, T: int = 4):
    return ParallelConverter("parallel", T=T, dataloader=[x], method="ema", progress=False).convert(ann)


def _converts_saves_and_loads(ann: nn.Module, x: torch.Tensor, tmp_path, T: int = 4):
    """Converts in float64, where the spike level equals the count domain (the table's claim that
    everything between neurons commutes with the time mean, measured), and in float32, the dtype
    saved networks are rebuilt in, which saves, loads and spikes the same."""
    snn = _convert(ann, x, T)
    torch.testing.assert_close(spike_inference(snn, x).mean(0), count_inference(snn, x), rtol=1e-10, atol=1e-10)
    x32 = x.float()
    snn32 = _convert(copy.deepcopy(ann).float(), x32, T)
    save_snn(snn32, tmp_path / "snn.pt")
    back = load_snn(tmp_path / "snn.pt")
    assert torch.equal(spike_inference(back, x32), spike_inference(snn32, x32))
    return snn


def _input(d: int) -> torch.Tensor:
    return torch.randn(SHAPES[d], dtype=torch.float64, generator=torch.Generator().manual_seed(1))


ANN_MODULES = [p for p in patterns.MODULE_PATTERNS if p.in_ann and p.role != "container"
               and p.module is not nn.MultiheadAttention]


@pytest.mark.parametrize("pattern", ANN_MODULES, ids=lambda p: p.module.__name__)
def test_every_module_pattern_converts_and_saves_or_is_refused_by_all(pattern, tmp_path):
    torch.manual_seed(0)
    module, d, place = _module(pattern.module)
    ann = Net(module, d, place).double().eval()
    x = _input(d)
    if place == "qcfs-site":
        ann.conv.weight.data *= 4  # reach several levels of the QCFS
    name = pattern.module.__name__
    if pattern.converts:
        snn = _converts_saves_and_loads(ann, x, tmp_path, T=4)
        if pattern.multistep == patterns.WRAPPED:
            # SpikingJelly's adapter swapped in the twin the table names.
            assert type(snn.m) is pattern.twin and pattern.module in WRAPPED_TYPES
        assert pattern.savable or pattern.multistep == patterns.CANONICAL
    else:
        with pytest.raises(GraphConversionError) as info:
            _convert(ann, x)
        kinds = {p.kind for p in info.value.problems}
        assert f"module {name}" in kinds, str(info.value)
        assert f"module type {name} is not supported" in str(info.value)
        if pattern.why:
            assert pattern.why in str(info.value)
        assert not pattern.savable and pattern.module not in WRAPPED_TYPES
        with pytest.raises(ValueError, match=rf"is a .*\.{name}, which saved networks do not support"):
            save_snn(nn.Sequential(module), tmp_path / "refused.pt")
        assert not (tmp_path / "refused.pt").exists()


def test_module_patterns_the_test_cannot_place_in_a_sequence_are_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv1d(2, 4, 3, padding=1), nn.ReLU()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.relu(self.conv(x))
            return self.attn(h, h, h)[0].flatten(1)

    with pytest.raises(GraphConversionError, match="module type MultiheadAttention is not supported"):
        _convert(Attention().eval(), torch.randn(3, 2, 8))


class _Leaf(fx.Tracer):
    """Keeps every module a call_module node, as graphs written by conversion hold them."""

    def is_leaf_module(self, m, qualname):
        return True


@pytest.mark.parametrize("module", [AnalogReLU(), neuron.IFNode(), layer.GroupNorm(2, 4), layer.SeqToANNContainer(
    nn.Conv2d(4, 4, 1))], ids=["AnalogReLU", "IFNode", "layer.GroupNorm", "SeqToANNContainer"])
def test_step_modules_pass_validation_only_where_the_table_says(module):
    """SpikingJelly step modules, and what conversion itself writes, are refused in an ANN's graph
    unless the table accepts them there (layer.GroupNorm: the twin of a refused pattern)."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), module)
    gm = fx.GraphModule(net, _Leaf().trace(net))
    with pytest.raises(GraphConversionError, match=rf"module type {type(module).__name__} is not supported"):
        prepare_graph(gm)


def test_spikingjelly_twins_of_accepted_patterns_pass_validation():
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), nn.ReLU(), layer.MaxPool2d(2),
                        layer.Upsample(scale_factor=2), layer.Flatten())
    gm = fx.GraphModule(net, _Leaf().trace(net))
    prepare_graph(gm)


def test_a_subclass_stands_for_its_base_only_while_it_computes_the_same():
    class Same(nn.Conv2d):
        pass

    class Other(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) ** 2

    assert patterns.module_pattern(Same(2, 4, 3)) is patterns.module_pattern(nn.Conv2d)
    assert patterns.module_pattern(Other(2, 4, 3)) is None
    for conv, ok in ((Same, True), (Other, False)):
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), conv(4, 4, 3))
        gm = fx.GraphModule(net, _Leaf().trace(net))
        if ok:
            prepare_graph(gm)
        else:
            with pytest.raises(GraphConversionError, match="module type Other is not supported"):
                prepare_graph(gm)


# -- functions and methods -----------------------------------------------------------------------
# How a network uses each function or method of the table on h (a ReLU's output [N, 4, 6, 6]), or
# as the activation itself on the convolution's output z ("site").
USES = {
    operator.add: lambda h: h + h,
    torch.add: lambda h: torch.add(h, h),
    operator.sub: lambda h: h - h / 2,
    torch.sub: lambda h: torch.sub(h, h / 2),
    operator.neg: lambda h: -h,
    torch.neg: lambda h: torch.neg(h),
    operator.mul: lambda h: h * 2.0,
    operator.truediv: lambda h: h / 4.0,
    torch.mul: lambda h: torch.mul(h, 0.5),
    torch.div: lambda h: torch.div(h, 3),
    torch.true_divide: lambda h: torch.true_divide(h, 3),
    operator.floordiv: lambda h: h // 2,
    torch.floor_divide: lambda h: torch.floor_divide(h, 2),
    operator.eq: lambda h: h == h,
    getattr: lambda h: h.reshape(h.shape[0], -1),
    operator.getitem: lambda h: h[:, 1:3],
    torch.cat: lambda h: torch.cat([h, h / 2], 1),
    torch.flatten: lambda h: torch.flatten(h, 1),
    torch.reshape: lambda h: torch.reshape(h, (-1, 144)),
    torch.transpose: lambda h: torch.transpose(h, 2, 3),
    torch.unsqueeze: lambda h: torch.unsqueeze(h, 1),
    torch.mean: lambda h: torch.mean(h, (2, 3)),
    torch.permute: lambda h: torch.permute(h, (0, 1, 3, 2)),
    torch.chunk: lambda h: torch.chunk(h, 2, 1)[1],
    F.relu: ("site", lambda z: F.relu(z)),
    F.relu_: ("site", lambda z: F.relu_(z)),
    torch.relu: ("site", lambda z: torch.relu(z)),
    torch.relu_: ("site", lambda z: torch.relu_(z)),
    F.relu6: ("site", lambda z: F.relu6(z)),
    torch.clamp: ("site", lambda z: torch.clamp(z, 0, 2)),
    torch.clip: ("site", lambda z: torch.clip(z, min=0)),
    F.hardtanh: ("site", lambda z: F.hardtanh(z, 0.0, 1.5)),
    F.pad: lambda h: F.pad(h, (1, 1, 0, 2), value=0.5),
    F.dropout: lambda h: F.dropout(h, 0.3, training=False),
    F.adaptive_avg_pool2d: lambda h: F.adaptive_avg_pool2d(h, 2),
    F.avg_pool2d: lambda h: F.avg_pool2d(h, 2),
    F.max_pool2d: lambda h: F.max_pool2d(h, 2),
    F.interpolate: lambda h: F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False),
    "size": lambda h: h.view(h.size(0), -1),
    "dim": lambda h: h * h.dim(),
    "view": lambda h: h.view(-1, 144),
    "reshape": lambda h: h.reshape(h.size(0), 2, -1),
    "flatten": lambda h: h.flatten(2),
    "permute": lambda h: h.permute(0, 2, 3, 1),
    "transpose": lambda h: h.transpose(1, 2),
    "unsqueeze": lambda h: h.unsqueeze(-1),
    "unflatten": lambda h: h.unflatten(1, (2, 2)),
    "expand": lambda h: h[:, :1].expand(-1, 3, -1, -1),
    "mean": lambda h: h.mean(-1),
    "chunk": lambda h: h.chunk(2, dim=1)[0],
    "contiguous": lambda h: h.transpose(2, 3).contiguous().view(h.size(0), -1),
    "add": lambda h: h.add(h),
    "sub": lambda h: h.sub(h / 2),
    "neg": lambda h: h.neg(),
    "mul": lambda h: h.mul(1.5),
    "div": lambda h: h.div(2),
    "true_divide": lambda h: h.true_divide(2),
    "relu": ("site", lambda z: z.relu()),
    "clamp": ("site", lambda z: z.clamp(min=0)),
    "clip": ("site", lambda z: z.clip(0, 3)),
}
# Shape arithmetic: functions the table allows on shape values (same at every step).
STATIC_USES = {
    operator.add: lambda h: h.reshape(h.size(0), h.size(1) + 0, -1),
    operator.sub: lambda h: h.reshape(h.size(0), h.size(1) - 2, -1),
    operator.neg: lambda h: h * -h.size(1),
    operator.mul: lambda h: h.reshape(h.size(0), h.size(2) * h.size(3), -1),
    operator.floordiv: lambda h: h.reshape(h.size(0), h.size(1) // 2, -1),
    operator.eq: lambda h: h * (h.size(1) == 4),
    getattr: lambda h: h.reshape(h.shape[0], -1),
    operator.getitem: lambda h: h.reshape(h.shape[0], h.shape[1], -1),
}


class UseNet(nn.Module):
    def __init__(self, use):
        super().__init__()
        self.site, self.use = (use[1], None) if isinstance(use, tuple) else (None, use)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            k = self.features(torch.zeros(SHAPES[2])).flatten(1).shape[1]
        self.fc = nn.Linear(k, 3)

    def features(self, x):
        z = self.conv(x)
        if self.site is not None:
            return self.site(z)
        return self.use(self.relu(z))

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


ANN_FUNCTIONS = [p for p in patterns.FUNCTION_PATTERNS + patterns.METHOD_PATTERNS if p.in_ann]


def test_every_function_pattern_has_a_use_here():
    assert {p.target for p in ANN_FUNCTIONS} == set(USES)
    assert {p.target for p in ANN_FUNCTIONS if p.static} == set(STATIC_USES) | {"size", "dim"}


def _id(target) -> str:
    if isinstance(target, str):
        return f".{target}()"
    return f"{getattr(target, '__module__', None) or 'torch'}.{target.__name__}".replace("_operator.", "operator.")


@pytest.mark.parametrize("pattern", ANN_FUNCTIONS, ids=lambda p: _id(p.target))
def test_every_function_pattern_converts_and_saves_or_is_refused(pattern, tmp_path):
    torch.manual_seed(0)
    ann = UseNet(USES[pattern.target]).double().eval()
    x = _input(2)
    if pattern.converts:
        _converts_saves_and_loads(ann, x, tmp_path)
        return
    with pytest.raises(GraphConversionError) as info:
        _convert(ann, x)
    assert any(p.kind in (pattern.name, "product of tensors") for p in info.value.problems), str(info.value)
    name = getattr(pattern.target, "__name__", pattern.target)
    saved = SAVABLE_METHODS if pattern.is_method else SAVABLE_FUNCTIONS.values()
    assert (pattern.target in saved) == pattern.static, name


@pytest.mark.parametrize("target", list(STATIC_USES), ids=_id)
def test_shape_arithmetic_converts_and_saves(target, tmp_path):
    torch.manual_seed(0)
    _converts_saves_and_loads(UseNet(STATIC_USES[target]).double().eval(), _input(2), tmp_path)


@pytest.mark.parametrize("use, kind", [
    (lambda h: h * h, "product of tensors"),
    (lambda h: torch.mul(h, h), "product of tensors"),
    (lambda h: h.add(h, alpha=2), "method .add()"),
    (lambda h: F.pad(h, (1, 1, 1, 1), mode="reflect"), "function pad"),
    (lambda h: torch.clamp(h, 0.5, 2), "function clamp"),
    (lambda h: F.interpolate(h, size=h.shape[2:]), "function interpolate"),
])
def test_canonicalised_patterns_refused_where_their_rewrite_does_not_apply(use, kind):
    with pytest.raises(GraphConversionError) as info:
        _convert(UseNet(use).eval(), torch.randn(SHAPES[2]))
    assert kind in {p.kind for p in info.value.problems}, str(info.value)


def test_allowlists_are_the_savable_patterns():
    savable_types = set(patterns.module_types(lambda p: p.savable))
    assert set(SAVABLE_MODULES.values()) - savable_types == {SAVABLE_MODULES["spikingjelly.StepModeTensorOp"]}
    assert savable_types <= set(SAVABLE_MODULES.values())
    assert nn.GroupNorm not in savable_types and layer.GroupNorm not in savable_types
    assert nn.Upsample in savable_types and layer.Upsample in savable_types
    assert set(SAVABLE_FUNCTIONS.values()) == {p.target for p in patterns.FUNCTION_PATTERNS if p.savable}
    assert accumulate in SAVABLE_FUNCTIONS.values()
    assert SAVABLE_METHODS == {p.target for p in patterns.METHOD_PATTERNS if p.savable}


def test_multistep_wrapping_uses_the_twins_of_the_table():
    """to_multistep swaps each wrapped type for its twin, whatever SpikingJelly's own list holds."""
    for p in patterns.MODULE_PATTERNS:
        if p.multistep == patterns.WRAPPED and p.accepted:
            module, d, _ = _module(p.module)
            gm = fx.GraphModule(nn.Sequential(module), _Leaf().trace(nn.Sequential(module)))
            out = to_multistep(gm)
            assert type(out.get_submodule("0")) is p.twin, p.module


# -- files ---------------------------------------------------------------------------------------
def test_a_network_saved_before_the_pattern_table_still_loads():
    """tests/data/saved_snn_v2.pt was written by the package before this table (make_saved_snn.py)."""
    snn = load_snn(DATA / "saved_snn_v2.pt")
    io = torch.load(DATA / "saved_snn_v2_io.pt", weights_only=True)
    assert snn.snn_metadata["written_by"] == "374176a"
    kinds = {type(m) for m in snn.modules()}
    assert {AnalogReLU, ChunkPart, ConstantScale, StepPad} <= kinds
    assert torch.equal(spike_inference(snn, io["x"]), io["spikes"])


def test_docs_table_is_the_table():
    assert (ROOT / "docs" / "patterns_table.inc").read_text() == patterns.table_rst(), (
        "run: python tools/patterns_table.py")


def test_activation_call_stays_outside_the_table():
    """QCFS-family activations reach the graph through activation_call, which the tracing pass turns
    into module calls before the table is read."""
    assert patterns.function_pattern(activation_call) is None
