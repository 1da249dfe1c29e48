"""The model zoo, torchvision ResNets, checkpoints, and the training example end to end."""
from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from sj_parallel_conversion import QCFS
from sj_parallel_conversion.tools import models
from sj_parallel_conversion.graph import prepare_graph
from sj_parallel_conversion.tracing import activation_calls_to_modules

ACT_TYPES = (nn.ReLU, QCFS)
ROOT = Path(__file__).resolve().parents[1]


def _input(name, n=2):
    return torch.randn(n, 1, 8, 8) if name == "digits_cnn" else torch.randn(n, 3, 32, 32)


def _build(name, act="relu", **kw):
    in_ch = 1 if name == "digits_cnn" else 3
    if name == "vgg16":
        kw.setdefault("hidden", 64)  # the 4096-wide classifier is slow to initialise
    return models.build_model(name, num_classes=7, act=act, L=4, theta=2.0, in_channels=in_ch, **kw)


def _trace(m: nn.Module) -> fx.GraphModule:
    # The plain tracer records each QCFS as one activation_call node; the recipe's first pass
    # turns those into call_module nodes.
    return activation_calls_to_modules(fx.symbolic_trace(m))


def _activation_calls(gm: fx.GraphModule):
    mods = dict(gm.named_modules())
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], ACT_TYPES)]


# The deeper CIFAR ResNets repeat resnet20's blocks; they run with the slow tests.
_DEEP = ("resnet32", "resnet44", "resnet56")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _DEEP else n
                                  for n in models.MODEL_NAMES])
@pytest.mark.parametrize("act", ["relu", "qcfs"])
def test_zoo_model_builds_runs_and_traces(name, act):
    torch.manual_seed(0)
    m = _build(name, act).eval()
    x = _input(name)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 7)
    gm = _trace(m)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)
    # every activation site is its own module instance, called exactly once
    calls = _activation_calls(gm)
    n_modules = sum(isinstance(mod, ACT_TYPES) for mod in m.modules())
    assert len(calls) == len(set(calls)) == n_modules > 0
    assert all(isinstance(mod, QCFS if act == "qcfs" else nn.ReLU) for mod in m.modules() if isinstance(mod, ACT_TYPES))
    # the classifier output has no activation
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert not (out_node.op == "call_module" and isinstance(gm.get_submodule(out_node.target), ACT_TYPES))


def test_qcfs_settings_reach_every_site():
    m = models.build_model("cnn", act="qcfs", L=3, theta=2.5)
    qs = [mod for mod in m.modules() if isinstance(mod, QCFS)]
    assert len(qs) == 5 and all(q.L == 3 and float(q.theta.detach()) == 2.5 for q in qs)
    assert len({id(q.theta) for q in qs}) == 5


def test_cnn_pools_after_activation():
    gm = fx.symbolic_trace(models.build_model("cnn"))
    mods = dict(gm.named_modules())
    pools = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], nn.MaxPool2d)]
    assert len(pools) == 2
    assert all(isinstance(mods[p.args[0].target], nn.ReLU) for p in pools)


def test_resnet_depths_and_option_a_shortcut():
    for depth, blocks in [(20, 9), (32, 15), (44, 21), (56, 27)]:
        m = models.build_model(f"resnet{depth}")
        convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
        assert len(convs) == 2 * blocks + 1  # option A: no shortcut convolutions
        assert sum(isinstance(mod, nn.Linear) for mod in m.modules()) == 1
    gm = fx.symbolic_trace(models.build_model("resnet20"))
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad]
    assert len(pads) == 2 and all(tuple(p.args[1]) == (0, 0, 0, 0, c // 4, c // 4) for p, c in zip(pads, (32, 64)))
    slices = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem]
    assert len(slices) == 2
    widths = [mod.out_channels for mod in models.build_model("resnet20").modules() if isinstance(mod, nn.Conv2d)]
    assert sorted(set(widths)) == [16, 32, 64]


def test_resnet_option_b_uses_conv_shortcuts():
    m = models.build_model("resnet20", shortcut="B")
    gm = fx.symbolic_trace(m)
    assert not any(n.op == "call_function" and n.target is F.pad for n in gm.graph.nodes)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 19 + 2 and sum(c.kernel_size == (1, 1) for c in convs) == 2
    with pytest.raises(ValueError, match="shortcut"):
        models.build_model("resnet20", shortcut="C")


def test_vgg16_pooling_option():
    with torch.device("meta"):  # structure only: no memory, no weight initialisation
        avg = models.build_model("vgg16", hidden=32)
        mx = models.build_model("vgg16", pool="max", hidden=32)
        default = models.build_model("vgg16")
    assert sum(isinstance(m, nn.AvgPool2d) for m in avg.modules()) == 5
    assert sum(isinstance(m, nn.MaxPool2d) for m in mx.modules()) == 5
    assert sum(isinstance(m, nn.Conv2d) for m in avg.modules()) == 13
    assert default.classifier[0].out_features == 4096


def test_unknown_model_and_activation():
    with pytest.raises(ValueError) as exc:
        models.build_model("resnet1000")
    assert "resnet1000" in str(exc.value) and all(n in str(exc.value) for n in models.MODEL_NAMES)
    with pytest.raises(ValueError, match="act"):
        models.build_model("cnn", act="gelu")


@pytest.mark.parametrize("depth, size", [(18, 64), pytest.param(50, 64, marks=pytest.mark.slow)])
def test_torchvision_resnet_matches_original(depth, size):
    import torchvision

    torch.manual_seed(0)
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=10).eval()
    for mod in ref.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    m = models.torchvision_resnet(depth, num_classes=10)
    m.load_state_dict(ref.state_dict())
    m.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
    # Blocks call one ReLU module at two or three sites; canonicalisation gives each call its own
    # module (one neuron, one threshold each), the stem keeping torchvision's name.
    calls = _activation_calls(fx.symbolic_trace(m))
    assert len(set(calls)) < len(calls)
    split = _activation_calls(prepare_graph(fx.symbolic_trace(m)))
    assert len(split) == len(set(split)) == len(calls)
    assert "relu" in split


def test_torchvision_resnet_weights_path(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None, num_classes=5)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    m = models.torchvision_resnet(18, num_classes=5, weights_path=str(tmp_path / "w.pt"))
    torch.testing.assert_close(m.fc.weight, ref.fc.weight)
    with pytest.raises(ValueError, match="do not match"):
        models.torchvision_resnet(18, num_classes=7, weights_path=str(tmp_path / "w.pt"))
    with pytest.raises(FileNotFoundError):
        models.torchvision_resnet(18, weights_path=str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="depth"):
        models.torchvision_resnet(19)


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    m = models.build_model("resnet20", act="qcfs", L=4, theta=3.0, shortcut="B").eval()
    with torch.no_grad():
        for q in m.modules():
            if isinstance(q, QCFS):
                q.theta.fill_(1.7)
    path = tmp_path / "sub" / "m.pt"
    models.save_checkpoint(path, m, name="resnet20", act="qcfs", L=4, num_classes=10, in_channels=3,
                           extra={"test_accuracy": 0.5}, kwargs={"shortcut": "B"})
    m2, meta = models.load_checkpoint(path)
    assert meta["name"] == "resnet20" and meta["test_accuracy"] == 0.5 and meta["kwargs"] == {"shortcut": "B"}
    assert "state_dict" not in meta and not m2.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        models.load_checkpoint(tmp_path / "nope.pt")
    blob = torch.load(path, weights_only=False)
    blob["kwargs"] = {}  # option A has no shortcut convolutions: the weights do not fit
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"does not fit model resnet20.*unexpected keys"):
        models.load_checkpoint(tmp_path / "bad.pt")
    blob["name"] = "no-such-net"
    torch.save(blob, tmp_path / "bad_name.pt")
    with pytest.raises(ValueError, match="no-such-net.*resnet56"):
        models.load_checkpoint(tmp_path / "bad_name.pt")
    torch.save({"weights": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a model checkpoint"):
        models.load_checkpoint(tmp_path / "junk.pt")


def test_checked_in_checkpoints_load():
    ckpt_dir = ROOT / "sj_parallel_conversion" / "tools" / "checkpoints"
    files = sorted(ckpt_dir.glob("*.pt"))
    if not files:
        pytest.skip("no checkpoints checked in")
    for f in files:
        assert f.stat().st_size < 5 * 2 ** 20, f
        m, meta = models.load_checkpoint(f)
        assert "optimizer" not in meta and 0 <= meta["test_accuracy"] <= 1
        with torch.no_grad():
            assert m(torch.randn(2, 3, 32, 32)).shape == (2, meta["num_classes"])


@pytest.mark.slow  # runs the training example
def test_train_cifar_end_to_end_and_resume(cifar10_dir, tmp_path, capsys, load_example):
    train = load_example("train_cifar")
    ck, ex = tmp_path / "state.pt", tmp_path / "final.pt"
    common = ["--model", "cnn", "--act", "qcfs", "--L", "4", "--theta", "2", "--limit-train", "256",
              "--limit-test", "128", "--batch-size", "64", "--data-root", str(cifar10_dir), "--no-progress",
              "--checkpoint", str(ck)]
    res = train.main(common + ["--epochs", "1", "--export", str(ex)])
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "test acc" in out and len(res["history"]) == 1
    blob = torch.load(ck, weights_only=False)
    assert blob["epoch"] == 1 and "optimizer" in blob and "scheduler" in blob
    m, meta = models.load_checkpoint(ex)
    assert "optimizer" not in meta and meta["test_images"] == 128 and meta["train_images"] == 256
    assert meta["act"] == "qcfs" and meta["L"] == 4 and isinstance(m.features[2], QCFS)

    res2 = train.main(common + ["--epochs", "2", "--resume"])
    out = capsys.readouterr().out
    assert "resumed" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert [h["epoch"] for h in res2["history"]] == [1, 2]
    assert torch.load(ck, weights_only=False)["epoch"] == 2
