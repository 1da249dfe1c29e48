"""Blocks of a traced network (sj_parallel_conversion.blocks) and the block-wise fit of distill."""
import copy

import pytest
import torch
import torch.nn as nn
from torch import fx

from sj_parallel_conversion import CalibrationSettings, DistillCalibration, ParallelConverter
from sj_parallel_conversion.blocks import block_boundaries, split_blocks
from sj_parallel_conversion.tools.models.cifar import CifarResNet


def _relu_sites(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.c2, self.a2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(self.a2(self.c2(self.a1(self.c1(x)))).flatten(1))


class Branches(nn.Module):
    """Two sites side by side: neither closes a block, since the other branch is still live."""

    def __init__(self):
        super().__init__()
        self.stem, self.a0 = nn.Conv2d(3, 4, 1), nn.ReLU()
        self.l, self.al = nn.Conv2d(4, 4, 1), nn.ReLU()
        self.r, self.ar = nn.Conv2d(4, 4, 1), nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a0(self.stem(x))
        return self.fc((self.al(self.l(h)) * self.ar(self.r(h))).mean((2, 3)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ReLU()

    def forward(self, x, y):
        return self.a(x) + y


def test_a_chain_is_cut_at_every_site_and_a_residual_network_only_where_the_skip_has_merged():
    chain = fx.symbolic_trace(Chain())
    assert block_boundaries(chain, _relu_sites(chain)) == ["a1", "a2"]
    resnet = fx.symbolic_trace(CifarResNet(nn.ReLU, depth=20, shortcut="A"))
    cuts = block_boundaries(resnet, _relu_sites(resnet))
    # the stem's activation and the activation closing each of the nine residual blocks
    assert cuts == ["act1"] + [f"layer{s}_{b}_act2" for s in (1, 2, 3) for b in range(3)]
    branches = fx.symbolic_trace(Branches())
    assert block_boundaries(branches, _relu_sites(branches)) == ["a0"]
    two = fx.symbolic_trace(TwoInputs())
    assert block_boundaries(two, ["a"]) == [] and len(split_blocks(two, ["a"])) == 1


@pytest.mark.parametrize("make", [Chain, Branches, lambda: CifarResNet(nn.ReLU, depth=20, shortcut="A")])
def test_running_the_blocks_in_order_computes_the_network_and_they_share_its_parameters(make):
    torch.manual_seed(0)
    net = make().eval()
    gm = fx.symbolic_trace(net)
    x = torch.randn(3, 3, 8, 8) if not isinstance(net, CifarResNet) else torch.randn(3, 3, 32, 32)
    blocks = split_blocks(gm, _relu_sites(gm))
    y = x
    for _, block in blocks:
        y = block(y)
    torch.testing.assert_close(y, net(x), rtol=0, atol=0)
    assert blocks[-1][0] == "output"
    params = {id(p) for p in gm.parameters()}
    assert all(id(p) in params for _, b in blocks for p in b.parameters())
    # every parameter belongs to exactly one block
    assert sum(len(list(b.parameters())) for _, b in blocks) == len(params)


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 8, 8, generator=g)]


def test_block_fit_reads_each_blocks_held_out_images_and_reports_each_block(monkeypatch):
    torch.manual_seed(0)
    ann = Chain().eval()
    opts = DistillCalibration(scope="blocks", steps=30, eval_every=10, batch_size=16, views=0)
    snn = ParallelConverter("parallel", T=2, dataloader=_data(), progress=False, method="distill",
                            calibration=CalibrationSettings(distill=opts)).convert(copy.deepcopy(ann))
    history = snn.calibration_report.learned
    assert [b["block"] for b in history["blocks"]] == ["a1", "a2", "output"]
    for record in history["blocks"]:
        assert record["best"] <= record["start"] and 0 <= record["kept_step"] <= 30
    assert history["steps_run"] == 3 * 30
    assert history["options"]["scope"] == "blocks"


def test_block_fit_improves_on_its_start_and_mixing_changes_the_result():
    torch.manual_seed(1)
    ann = Chain().eval()
    common = dict(scope="blocks", steps=60, eval_every=10, batch_size=16, views=0, weight_lr=3e-3, lr=3e-3)
    outs = {}
    for mix in (0.0, 0.5):
        snn = ParallelConverter("parallel", T=1, dataloader=_data(), progress=False, method="distill",
                                calibration=CalibrationSettings(distill=DistillCalibration(mix=mix, **common))).convert(copy.deepcopy(ann))
        report = snn.calibration_report
        outs[mix] = snn
        first = report.learned["held_out_agreement"][0][1]
        assert report.scores["distill"]["agreement"] >= first
        assert any(b["best"] < b["start"] for b in report.learned["blocks"])
    w0, w1 = (dict(s.named_parameters()) for s in (outs[0.0], outs[0.5]))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


@pytest.mark.parametrize("kw, match", [(dict(scope="layers"), "scope"), (dict(mix=1.0), "mix"), (dict(mix=-0.1), "mix")])
def test_block_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillCalibration(**kw)


def test_a_block_cache_over_budget_is_refused_before_fitting_and_auto_skips_the_fit(monkeypatch):
    from sj_parallel_conversion import learned
    ann = Chain().eval()
    fitted = []
    monkeypatch.setattr(learned, "_fit_block", lambda *a, **k: fitted.append(1) or {})
    tiny = DistillCalibration(scope="blocks", steps=5, views=0, cache_gib=1e-6)
    with pytest.raises(learned.BlockCacheTooLarge, match=r"cache_gib=1e-06.*max_images or views"):
        ParallelConverter("parallel", T=2, dataloader=_data(), progress=False, method="distill",
                          calibration=CalibrationSettings(distill=tiny)).convert(copy.deepcopy(ann))
    assert not fitted
    from sj_parallel_conversion import recipe
    monkeypatch.setattr(recipe, "irreplaceable", lambda *a, **k: (False, 99))  # measure every candidate
    snn = ParallelConverter("parallel", T=2, dataloader=_data(), progress=False, method="auto",
                            calibration=CalibrationSettings(distill=tiny, skip_agreement=None)).convert(copy.deepcopy(ann))
    report = snn.calibration_report
    assert not fitted and "GiB of activations" in report.skipped["distill"] and "distill" not in report.scores
    assert report.method in ("none", "ema", "mse")
    # the estimate: three float32 tensors of the widest boundary (4 x 8 x 8) per image
    blocks = split_blocks(fx.symbolic_trace(ann), ["a1", "a2"])
    assert learned.check_block_cache(blocks, torch.zeros(1, 3, 8, 8), 10, 1.0) == 3 * 4 * 8 * 8 * 4 * 10
