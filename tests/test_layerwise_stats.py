"""Per-layer time steps and spike/energy statistics."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sj_parallel_conversion import ParallelConversionNode, ParallelConverter, count_inference, spike_inference
from sj_parallel_conversion.layerwise import effective_T, search_layer_T, site_weights
from sj_parallel_conversion.stats import E_AC_PJ, E_MAC_PJ, spike_statistics


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()


def _data(n=128):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x


def test_mixed_T_network_count_domain_equals_spike_level():
    x = _data()
    snn = ParallelConverter("parallel", T={"1": 2, "3": 8}, dataloader=[x], progress=False, method="ema").convert(_net())
    assert [m.T for m in snn.modules() if isinstance(m, ParallelConversionNode)] == [2, 8]
    spikes = spike_inference(snn, x, T=8)
    assert spikes.shape[0] == 8
    torch.testing.assert_close(spikes.mean(0), count_inference(snn, x), rtol=1e-4, atol=1e-5)


def test_effective_T_by_hand():
    assert effective_T({"a": 2, "b": 8}) == 5
    assert effective_T({"a": 2, "b": 8}, {"a": 3.0, "b": 1.0}) == pytest.approx((2 * 3 + 8) / 4)


def test_site_weights_are_consumer_macs():
    x = _data(4)
    snn = ParallelConverter("parallel", T=4, dataloader=[x], progress=False, method="ema").convert(_net())
    w = site_weights(snn, x)
    # site "1" feeds conv "2": 6 out channels * 4*4 positions * (6*3*3) per image
    assert w["1"] == 6 * 16 * 6 * 9
    # site "3" feeds the linear layer through Flatten: 96 * 5
    assert w["3"] == 96 * 5


def test_search_keeps_accuracy_within_budget_and_lowers_T():
    x = _data(256)
    ann = _net()
    y = ann(x).argmax(1)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    res = search_layer_T(ann, loader, loader, T_max=16, candidates=(2, 4, 8), max_loss=0.05)
    assert res.uniform_accuracy - res.accuracy <= 0.05 + 1e-9
    assert all(t <= 16 for t in res.T.values()) and res.mean_T < 16
    assert res.trials[0]["T"] == {k: 16 for k in res.T}
    # The reported accuracies are those of the networks the search settled on, recomputed here.
    for T, acc in ((res.T, res.accuracy), ({k: 16 for k in res.T}, res.uniform_accuracy)):
        snn = ParallelConverter("parallel", T=T, dataloader=loader, progress=False, method="ema").convert(_net())
        assert acc == sum(int((count_inference(snn, xb).argmax(1) == yb).sum()) for xb, yb in loader) / 256


def test_search_rejects_loaders_that_reshuffle():
    from torch.utils.data import DataLoader, TensorDataset

    x = _data(64)
    fixed = [(x, torch.zeros(64, dtype=torch.long))]
    shuffled = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=32, shuffle=True)
    with pytest.raises(ValueError, match="search_loader shuffles"):
        search_layer_T(_net(), fixed, shuffled, T_max=4, candidates=(2,))
    with pytest.raises(ValueError, match="calib_loader shuffles"):
        search_layer_T(_net(), shuffled, fixed, T_max=4, candidates=(2,))


def test_sops_count_exactly_spike_fanout():
    """Hand check: a linear layer fed by spikes performs nnz(spikes) * out_features SOPs; a conv
    performs, per spike, one accumulate per output it reaches (borders included)."""
    x = _data(8)
    snn = ParallelConverter("parallel", T=4, dataloader=[x], progress=False, method="ema").convert(_net())
    rep = spike_statistics(snn, x)
    by = {l.name: l for l in rep.layers}
    # brute-force the fan-out with the recorded spikes
    recorded = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: recorded.__setitem__(n, o.clone()))
             for n, m in snn.named_modules() if isinstance(m, ParallelConversionNode)]
    spike_inference(snn, x)
    for h in hooks:
        h.remove()
    s3 = recorded["3"]  # [T, N, 6, 4, 4] spikes into the linear layer
    assert by["5"].sops_per_image == pytest.approx(float((s3 != 0).sum()) * 5 / 8)
    s1 = (recorded["1"] != 0).float()  # [T, N, 6, 8, 8] into conv 3x3 stride 2 pad 1 -> 4x4
    reach = torch.zeros(8, 8)
    for oy in range(4):
        for ox in range(4):
            for ky in range(3):
                for kx in range(3):
                    iy, ix = 2 * oy - 1 + ky, 2 * ox - 1 + kx
                    if 0 <= iy < 8 and 0 <= ix < 8:
                        reach[iy, ix] += 1
    brute = float((s1 * reach).sum()) * 6 / 8  # each reached output position exists for 6 out channels
    assert by["2"].sops_per_image == pytest.approx(brute)
    assert by["0"].input == "analog" and by["2"].input == "spikes"
    # firing rates, MACs by hand, and the energy from the brute-force SOP count
    assert by["1"].firing_rate == pytest.approx(float((recorded["1"] != 0).sum()) / (6 * 64 * 4 * 8))
    macs = {"0": 8 * 8 * 6 * (3 * 3 * 3), "2": 4 * 4 * 6 * (6 * 3 * 3), "5": 96 * 5}
    assert {k: by[k].macs_per_image for k in macs} == macs
    assert rep.ann_macs == sum(macs.values())
    sops = brute + float((s3 != 0).sum()) * 5 / 8
    assert rep.snn_energy_uj == pytest.approx((macs["0"] * E_MAC_PJ + sops * E_AC_PJ) * 1e-6)


def test_spikingjelly_synop_counter_misses_scaled_spikes():
    """Why stats.py counts SOPs itself: SpikingJelly's SynOpCounter only sees 0/1 tensors."""
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    x = _data(8)
    snn = ParallelConverter("parallel", T=4, dataloader=[x], progress=False, method="ema").convert(_net())
    counter = SynOpCounter()
    with DispatchCounterMode([counter]):
        spike_inference(snn, x)
    assert counter.get_total() == 0
    assert spike_statistics(snn, x).total_sops > 0


class _Joins(nn.Module):
    """Two spiking branches of different T summed (a time-mean join), average-pooled into a conv,
    then a global average pool into a linear layer: inputs that carry several spikes each."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool, self.c3 = nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1)
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 5)

    def forward(self, x):
        h = self.pool(self.r1(self.c1(x)) + self.r2(self.c2(x)))
        return self.fc(torch.flatten(self.gap(self.r3(self.c3(h))), 1))


def test_sops_count_every_spike_after_pooling_sums_and_time_mean_joins():
    """Issue 26: a value that gathers several spikes (window of an average pool, residual sum,
    time-mean join of trains of different T, global pooling) counts each of them, not once."""
    x = _data(8)
    snn = ParallelConverter("parallel", T={"r1": 2, "r2": 4, "r3": 4}, dataloader=[x], progress=False,
                            method="ema").convert(_Joins().eval())
    rep = spike_statistics(snn, x)
    assert rep.unmodelled == []
    by = {l.name: l for l in rep.layers}
    recorded = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: recorded.__setitem__(n, (o != 0).float().clone()))
             for n, m in snn.named_modules() if isinstance(m, ParallelConversionNode)]
    spike_inference(snn, x)
    for h in hooks:
        h.remove()
    # The join gathers each train's spikes into one step; the pool sums each 2x2 window.
    gathered = recorded["r1"].sum(0) + recorded["r2"].sum(0)                 # [N, 4, 8, 8]
    per_entry = F.avg_pool2d(gathered, 2, divisor_override=1)                # [N, 4, 4, 4]
    reach = torch.tensor([2.0, 3.0, 3.0, 2.0])                              # 3x3, padding 1, on 4x4
    brute_c3 = float((per_entry * reach[:, None] * reach[None, :]).sum()) * 4 / 8
    assert by["c3"].input == "spikes" and by["c3"].sops_per_image == pytest.approx(brute_c3)
    brute_fc = float(recorded["r3"].sum()) * 5 / 8                            # every spike reaches 5 outputs
    assert by["fc"].sops_per_image == pytest.approx(brute_fc)
    # Counting nonzero inputs instead (what a value-based count sees) is strictly less here.
    assert float((per_entry != 0).float().mul(reach[:, None] * reach[None, :]).sum()) * 4 / 8 < brute_c3
    assert rep.total_sops == pytest.approx(brute_c3 + brute_fc)


def test_an_operation_outside_the_counted_list_is_named_in_the_report():
    """stats_layerwise.rst: an operation the counter does not model counts its nonzero outputs
    (a lower bound) and is named in ``report.unmodelled``, its dict and under the printed table."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = _data(8)
    snn = ParallelConverter("parallel", T=4, dataloader=[x], progress=False, method="ema").convert(ann)
    plain = spike_statistics(snn, x)
    assert plain.unmodelled == []
    # a user's edit of the converted graph: |spikes| after the first neuron, an operation the
    # counter has no rule for
    graph = snn.graph
    first = next(n for n in graph.nodes
                 if n.op == "call_module" and isinstance(snn.get_submodule(n.target), ParallelConversionNode))
    with graph.inserting_after(first):
        edited = graph.call_function(torch.abs, (first,))
    first.replace_all_uses_with(edited)
    edited.args = (first,)
    snn.recompile()
    rep = spike_statistics(snn, x)
    assert rep.unmodelled == ["call_function abs"]
    assert rep.as_dict()["unmodelled"] == ["call_function abs"]
    assert "SOPs after call_function abs count nonzero values" in rep.to_text()
    assert 0 < rep.total_sops <= plain.total_sops
