"""The package uses SpikingJelly through its public API only and leaves its module state alone:
no private name is imported or assigned, and SpikingJelly's tracer (and every other attribute of
its loaded modules) is the same object after any recipe call, a failed conversion included."""
from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import ann2snn
from torch import fx

from sj_parallel_conversion import (ClipReLU, NetworkSettings, ParallelConversionRecipe, ParallelConverter, QCFS,
                                    count_inference)
from sj_parallel_conversion.activation import DAQCFS, activation_call
from sj_parallel_conversion.tracing import activation_calls_to_modules, fold_bn

PACKAGE = Path(__file__).resolve().parents[1] / "sj_parallel_conversion"


def _private_uses(path: Path):
    """(line, text) of every private SpikingJelly name the file imports, reads or assigns."""
    tree = ast.parse(path.read_text(), str(path))
    sj_names = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "spikingjelly":
                    sj_names.add((a.asname or a.name).split(".")[0])
                    if any(part.startswith("_") for part in a.name.split(".")):
                        found.append((node.lineno, a.name))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "spikingjelly":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append((node.lineno, node.module))
            for a in node.names:
                sj_names.add(a.asname or a.name)
                if a.name.startswith("_"):
                    found.append((node.lineno, f"{node.module}.{a.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in sj_names:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
            if isinstance(node.ctx, (ast.Store, ast.Del)):
                found.append((node.lineno, f"assigns {node.value.id}.{node.attr}"))
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Name) \
                and node.args[0].id in sj_names:
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("setattr", "delattr", "object"):  # setattr(sj, ...), mock.patch.object(sj, ...)
                found.append((node.lineno, f"{name}({node.args[0].id}, ...)"))
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_spikingjelly_name(path):
    assert _private_uses(path) == []


def test_the_scan_finds_private_uses(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from spikingjelly.activation_based.ann2snn import converter as c\n"
                   "from spikingjelly.x._y import z\n"
                   "from spikingjelly.a import _b\n"
                   "c._symbolic_trace = None\n"
                   "c.tqdm = None\n"
                   "mock.patch.object(c, 'tqdm', None)\n")
    lines = sorted(line for line, _ in _private_uses(bad))
    assert lines == [2, 3, 4, 4, 5, 6]


# -- module state -------------------------------------------------------------------------------
def _snapshot():
    """Identity of every attribute of every loaded SpikingJelly module, and torch.fx's tracer."""
    state = {}
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] == "spikingjelly" and mod is not None:
            # the warnings machinery keeps its own registry in module namespaces
            state[name] = {k: id(v) for k, v in vars(mod).items() if k != "__warningregistry__"}
    state["torch.fx.Tracer"] = {k: id(v) for k, v in vars(fx.Tracer).items()}
    state["torch.reshape"] = {"": id(torch.reshape)}
    return state


class QNet(nn.Module):
    def __init__(self, L=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.q1 = QCFS(L, theta=2.0)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.q2 = QCFS(L, theta=torch.full((6,), 1.5))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.q1(self.bn(self.c1(x)))
        x = F.max_pool2d(self.q2(self.c2(x)), 2)
        return self.fc(x.mean((2, 3)))


def _qnet():
    torch.manual_seed(0)
    m = QNet()
    m.bn.running_mean.normal_()
    m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_recipe_calls_leave_spikingjelly_state_unchanged():
    x = torch.randn(8, 3, 6, 6)
    loader = [x]
    before = _snapshot()
    rec = ParallelConversionRecipe(T=4, progress=False)
    conv = ann2snn.Converter(rec)
    rec.validate(conv)
    rec.before_trace(conv, _qnet())  # alone, with no conversion after it
    assert _snapshot() == before
    # The next, unrelated SpikingJelly conversion still traces with SpikingJelly's own tracer:
    # a ReLU net converted by its RateCodingRecipe holds IF neurons and no parallel neuron.
    relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
    sj_snn = ann2snn.Converter(ann2snn.RateCodingRecipe(loader)).convert(relu)
    assert "ParallelConversionNode" not in str(sj_snn)
    for convert in (lambda m: ann2snn.Converter(ParallelConversionRecipe(T=4, progress=False)).convert(m),
                    lambda m: ParallelConverter("parallel", T=2, dataloader=loader, progress=False).convert(m)):
        snn = convert(_qnet())
        assert sum(type(m).__name__ == "ParallelConversionNode" for m in snn.modules()) == 2
        assert _snapshot() == before

    # Conversions that fail midway: in after_trace (no data for a ReLU net) and in calibration
    # (a loader whose batches are not tensors).
    with pytest.raises(ValueError, match="dataloader"):
        ann2snn.Converter(ParallelConversionRecipe(T=4, progress=False)).convert(copy.deepcopy(relu))
    assert _snapshot() == before
    with pytest.raises(TypeError):
        ParallelConverter("parallel", T=2, dataloader=[["not", "a", "tensor"]], progress=False).convert(_qnet())
    assert _snapshot() == before


def test_plain_tracer_records_each_activation_as_one_call():
    """fx.symbolic_trace, the tracer SpikingJelly uses, keeps QCFS/ClipReLU/DAQCFS whole."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = QCFS(4, theta=torch.full((3,), 2.0))
            self.c = ClipReLU(1.0)
            self.d = DAQCFS(4, 1.0, psi_da=0.1)

        def forward(self, x):
            return self.d(self.c(self.q(x)) + self.q(-x))

    net = Net().eval()
    gm = fx.symbolic_trace(net)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is activation_call]
    assert [n.args[0].target for n in calls] == ["q", "c", "q", "d"]
    x = torch.randn(2, 3, 4, 4) * 3
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)
    gm = activation_calls_to_modules(gm)
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert mods == ["q", "c", "q", "d"]
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" or n.target is activation_call]
    assert all("nn_module_stack" in n.meta for n in gm.graph.nodes if n.op == "call_module")
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)


def test_fold_bn_matches_the_unfolded_model_and_skips_shared_convs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # c2 called twice: not folded
            self.c3, self.b3 = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.b1(self.c1(x))
            y = self.b2(self.c2(y)) + self.c2(y)
            return self.b3(self.c3(y.flatten(2)))

    torch.manual_seed(1)
    net = Net()
    for bn in (net.b1, net.b2, net.b3):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    net.eval()
    x = torch.randn(2, 3, 7, 7)
    gm = fold_bn(fx.symbolic_trace(net))
    kinds = {n.target: type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds == {"c1": "Conv2d", "c2": "Conv2d", "b2": "BatchNorm2d", "c3": "Conv1d"}
    torch.testing.assert_close(gm(x), net(x), rtol=1e-5, atol=1e-5)
    net.train()
    with pytest.raises(ValueError, match="'b1'.*'c1'|eval mode"):
        fold_bn(fx.symbolic_trace(net))


def test_recipe_fuse_bn_option_and_lossless_output():
    ann = _qnet()
    x = torch.randn(4, 3, 6, 6)
    folded = ParallelConverter("parallel", T=4, progress=False, network=NetworkSettings(fuse_bn=True)).convert(copy.deepcopy(ann))
    # Lossless (QCFS, T == L): by default BN stays unfolded and the count domain is exact.
    kept = ParallelConverter("parallel", T=4, progress=False).convert(copy.deepcopy(ann))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
    assert torch.equal(count_inference(kept, x), ann(x))
