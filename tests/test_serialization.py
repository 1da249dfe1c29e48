"""save_snn / load_snn: a converted network rebuilt from tensors and plain containers only."""
import os

import pytest
import torch
import torch.nn as nn

from sj_parallel_conversion import (NetworkSettings, ParallelConversionNode, ParallelConversionRecipe, ParallelConverter,
                                    count_inference, load_snn, save_snn, spike_inference)
from sj_parallel_conversion import fileio
from sj_parallel_conversion.tools import models
from sj_parallel_conversion.joins import TimeMean

CKPT = os.path.join(os.path.dirname(__file__), "..", "sj_parallel_conversion", "tools", "checkpoints")


def _convert(ann, T, x, **kw):
    return ParallelConverter(ParallelConversionRecipe(T, [x], progress=False, **kw)).convert(ann.eval())


class TinyRes(nn.Module):
    """A residual block: with different T in its two branches the conversion inserts TimeMean joins."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu1(self.conv1(x))
        y = self.relu2(self.conv2(h))
        y = self.relu3(y + h)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("source", ["cifar10_cnn_relu.pt", "cifar10_cnn_qcfs_L4.pt", "per-layer-T"])
def test_round_trip_is_bit_identical(tmp_path, source):
    torch.manual_seed(0)
    if source == "per-layer-T":
        ann, x = TinyRes(), torch.rand(6, 3, 8, 8)
        snn = _convert(ann, {"relu1": 8, "relu2": 2, "relu3": 4}, x, method="ema")
        assert any(isinstance(m, TimeMean) for m in snn.modules())
    else:
        ann, _ = models.load_checkpoint(os.path.join(CKPT, source))
        x = torch.rand(6, 3, 32, 32)
        snn = _convert(ann, 6, x, method="ema")
    path = tmp_path / "snn.pt"
    save_snn(snn, path, metadata={"T": 6, "source": source})
    torch.load(path, weights_only=True)  # the file itself needs no pickle
    back = load_snn(path)
    assert back is not snn and back.snn_metadata == {"T": 6, "source": source}
    probe = torch.rand(5, *x.shape[1:])
    s0, s1 = spike_inference(snn, probe), spike_inference(back, probe)
    assert s0.abs().sum() > 0 and torch.equal(s0, s1)
    assert torch.equal(count_inference(snn, probe), count_inference(back, probe))
    nodes0 = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    nodes1 = [m for m in back.modules() if isinstance(m, ParallelConversionNode)]
    assert [(n.T, n.spike_order, n.channel_dim) for n in nodes0] == [(n.T, n.spike_order, n.channel_dim) for n in nodes1]


def test_node_state_carries_T_order_and_channel_dim():
    saved = ParallelConversionNode(8, v_threshold=torch.rand(3) + 0.5).state_dict()
    ParallelConversionNode(8).load_state_dict(saved)  # same structure: loads, per-channel shapes adopted
    for field, other in (("T", dict(T=4)), ("spike_order", dict(T=8, spike_order="early")),
                         ("channel_dim", dict(T=8, channel_dim=2))):
        with pytest.raises(RuntimeError, match=f"_extra_state.*{field}="):
            ParallelConversionNode(**other).load_state_dict(saved)


def test_T_mismatch_in_a_network_names_the_node(tmp_path):
    ann, _ = models.load_checkpoint(os.path.join(CKPT, "cifar10_cnn_qcfs_L4.pt"))
    x = torch.rand(4, 3, 32, 32)
    snn8 = _convert(ann, 8, x, method="ema")
    snn4 = _convert(models.load_checkpoint(os.path.join(CKPT, "cifar10_cnn_qcfs_L4.pt"))[0], 4, x, method="ema")
    with pytest.raises(RuntimeError, match=r"_extra_state: the state was saved with T=8 .* has T=4"):
        snn4.load_state_dict(snn8.state_dict())


def test_unknown_module_type_refused_at_save(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(nn.Linear(2, 2), Custom())
    with pytest.raises(ValueError, match=r"module '1' is a .*Custom"):
        save_snn(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_network_that_would_not_come_back_exactly_is_refused_and_nothing_is_written(tmp_path):
    """A float64 network (rebuilt as float32) is refused at save; the previous file stays, no temp file."""
    model = nn.Sequential(nn.Linear(2, 2)).double()
    path = tmp_path / "x.pt"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match=r"would not be rebuilt exactly .*'0\.weight'.*float64.*float32"):
        save_snn(model, path)
    assert os.listdir(tmp_path) == ["x.pt"] and path.read_bytes() == b"previous"


def test_unknown_function_refused_at_save(tmp_path):
    class UsesSoftplus(nn.Module):
        def forward(self, x):
            return nn.functional.softplus(x)

    gm = torch.fx.symbolic_trace(UsesSoftplus())
    with pytest.raises(ValueError, match="softplus.*allowlist"):
        save_snn(gm, tmp_path / "x.pt")


def test_plain_module_tree_round_trip(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).eval()
    save_snn(model, tmp_path / "m.pt")
    back = load_snn(tmp_path / "m.pt")
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(model(x), back(x)) and back[0].bias is None and not back.training


def test_crafted_and_foreign_files_refused(tmp_path):
    from test_files import crafted_file

    path, marker = crafted_file(tmp_path)
    with pytest.raises(fileio.FileError, match="pickle.*save_snn"):
        load_snn(path)
    assert not marker.exists()
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(fileio.FileError, match="not a network saved by save_snn"):
        load_snn(tmp_path / "plain.pt")


def test_file_naming_a_type_outside_the_allowlist_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    save_snn(model, tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["modules"][1]["type"] = "os.system"
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(fileio.FileError, match="'os.system', which is not in the allowlist"):
        load_snn(tmp_path / "m.pt")


def test_traced_tensor_constants_round_trip(tmp_path):
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * torch.tensor([1.0, 2.0, 3.0])

    gm = torch.fx.symbolic_trace(WithConstant())
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    save_snn(gm, tmp_path / "c.pt")
    x = torch.randn(2, 3)
    assert torch.equal(load_snn(tmp_path / "c.pt")(x), gm(x))


@pytest.mark.slow  # torchvision-sized networks
@pytest.mark.parametrize("name", ["resnet18", "densenet121", "regnet_x_400mf", "shufflenet_v2_x0_5", "squeezenet1_1"])
def test_torchvision_families_round_trip(tmp_path, name):
    import torchvision

    torch.manual_seed(0)
    ann = torchvision.models.get_model(name, weights=None)
    x = torch.rand(2, 3, 64, 64)
    snn = _convert(ann, 4, x, method="ema")
    save_snn(snn, tmp_path / "tv.pt")
    back = load_snn(tmp_path / "tv.pt")
    assert torch.equal(count_inference(snn, x), count_inference(back, x))
    assert torch.equal(spike_inference(snn, x[:1]), spike_inference(back, x[:1]))


class ScaleChunk(nn.Module):
    """Constant scaling and a channel split then a concatenation (ShuffleNet patterns)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.relu(self.conv(x) * 2.0)
        a, b = h.chunk(2, dim=1)
        y = torch.cat([a, self.relu2(self.conv2(b) / 4.0)], dim=1)
        y = nn.functional.avg_pool2d(y, 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_constant_scaling_and_channel_split_round_trip(tmp_path):
    from sj_parallel_conversion.graph import ChunkPart, ConstantScale

    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    snn = _convert(ScaleChunk(), 4, x, method="ema")
    kinds = {type(m) for m in snn.modules()}
    assert ConstantScale in kinds and ChunkPart in kinds
    save_snn(snn, tmp_path / "sc.pt")
    back = load_snn(tmp_path / "sc.pt")
    assert {type(m) for m in back.modules()} >= {ConstantScale, ChunkPart}
    assert torch.equal(count_inference(snn, x), count_inference(back, x))
    assert torch.equal(spike_inference(snn, x), spike_inference(back, x))


def test_analog_relu_sites_round_trip(tmp_path):
    """A network whose first ReLU stays analog (AnalogReLU) is rebuilt with that site analog."""
    from sj_parallel_conversion.graph import AnalogReLU

    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    snn = _convert(TinyRes(), 4, x, method="ema", network=NetworkSettings(analog_sites=["relu1"]))
    assert isinstance(snn.relu1, AnalogReLU)
    save_snn(snn, tmp_path / "analog.pt", metadata={"T": 4})
    back = load_snn(tmp_path / "analog.pt")
    assert type(back.relu1) is AnalogReLU
    assert [n for n, m in back.named_modules() if isinstance(m, ParallelConversionNode)] == ["relu2", "relu3"]
    probe = torch.rand(5, 3, 8, 8) - 0.5  # negative inputs too: the analog ReLU must clip them
    s0 = spike_inference(snn, probe)
    assert s0.abs().sum() > 0 and torch.equal(s0, spike_inference(back, probe))
    assert torch.equal(count_inference(snn, probe), count_inference(back, probe))


@pytest.mark.slow  # 30-60 s each on 2 loaded CPU cores
@pytest.mark.parametrize("name, size", [("googlenet", 64), ("inception_v3", 75)])  # 75: inception's smallest input
def test_inception_family_round_trip(tmp_path, name, size):
    """Inception blocks (four parallel branches joined by a concatenation), converted, saved, rebuilt."""
    import torchvision

    torch.manual_seed(0)
    ann = torchvision.models.get_model(name, weights=None, aux_logits=False, init_weights=True)
    x = torch.rand(2, 3, size, size)
    snn = _convert(ann, 4, x, method="ema")
    save_snn(snn, tmp_path / f"{name}.pt")
    back = load_snn(tmp_path / f"{name}.pt")
    assert sum(isinstance(m, ParallelConversionNode) for m in back.modules()) == \
        sum(isinstance(m, ParallelConversionNode) for m in snn.modules()) > 20
    out = count_inference(snn, x)
    assert out.abs().sum() > 0 and torch.equal(out, count_inference(back, x))
    assert torch.equal(spike_inference(snn, x[:1]), spike_inference(back, x[:1]))


@pytest.mark.parametrize("name,value,rule", [
    ("v_threshold", float("nan"), "finite"), ("v_threshold", 0.0, "positive"), ("v_threshold", -1.0, "positive"),
    ("v_threshold", float("inf"), "finite"), ("spike_value", float("nan"), "finite"),
    ("psi", float("inf"), "finite"),
])
def test_saved_network_with_bad_neuron_parameters_is_refused(tmp_path, name, value, rule):
    """A file whose neuron holds a value the constructor refuses does not load (it used to, and
    scored at chance level as if nothing were wrong)."""
    torch.manual_seed(0)
    snn = _convert(TinyRes(), 4, torch.rand(6, 3, 8, 8), method="ema")
    save_snn(snn, tmp_path / "snn.pt")
    blob = torch.load(tmp_path / "snn.pt", weights_only=True)
    blob["state_dict"][f"relu2.{name}"].reshape(-1)[0] = value
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(fileio.FileError, match=rf"bad.pt.*module 'relu2' \(ParallelConversionNode\): {name} "
                                               rf"must be {rule}, got"):
        load_snn(tmp_path / "bad.pt")
