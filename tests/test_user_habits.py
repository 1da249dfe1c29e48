"""What SpikingJelly users do to a converted network as a matter of course: ``net.train()``, casts
followed by ``load_state_dict``, ``channels_last``, backward, monitors next to the count domain."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import ann2snn, monitor

from sj_parallel_conversion import (QCFS, CalibrationSettings, ParallelConversionNode, ParallelConversionRecipe, count_domain_model,
                                    count_inference, save_snn, spike_inference)

L = 4


class QCFSNet(nn.Module):
    """A QCFS network keeps its BatchNorm (folding would change rounding), and has a dropout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.c1, self.bn1, self.q1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), QCFS(L=L, theta=2.0)
        self.c2, self.bn2, self.q2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), QCFS(L=L, theta=2.0)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)
        for bn in (self.bn1, self.bn2):  # statistics that differ from any batch's own
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.q2(self.bn2(self.c2(self.q1(self.bn1(self.c1(x))))))
        return self.fc(self.drop(h.mean((2, 3))))


def _x(n=16, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def qcfs_snn():
    ann = QCFSNet().eval()
    return ann, ann2snn.Converter(ParallelConversionRecipe(T=L, progress=False)).convert(ann)


def test_train_mode_leaves_batchnorm_and_dropout_in_eval_mode(qcfs_snn):
    ann, snn = qcfs_snn
    x = _x()
    with torch.no_grad():
        expected = ann(x)
    stats = {k: v.clone() for k, v in snn.state_dict().items() if "running" in k}
    assert len(stats) == 4
    snn.train()
    assert snn.training and not snn.bn1.training and not snn.drop.training
    assert all(m.training for m in snn.modules() if isinstance(m, (nn.Conv2d, ParallelConversionNode)))
    # Still the ANN's function, and the running statistics untouched by the runs.
    assert torch.equal(count_inference(snn, x), expected)
    assert spike_inference(snn, x).mean(0).argmax(1).equal(expected.argmax(1))
    assert all(torch.equal(v, snn.state_dict()[k]) for k, v in stats.items())
    snn.eval()
    assert not any(m.training for m in snn.modules())
    assert torch.equal(count_inference(snn, x), expected)


def test_backward_through_the_count_domain_raises_as_at_spike_level(qcfs_snn):
    _, snn = qcfs_snn
    counted = count_domain_model(snn)
    x = _x(4).requires_grad_()
    out = counted(x)  # the forward runs; only a backward would give meaningless (zero) gradients
    with pytest.raises(RuntimeError, match="inference-only operator"):
        out.sum().backward()
    # The copy's parameters need no gradient (snn's still do): nothing to record without an input
    # that asks, so a compiled forward needs no backward either (tests/test_compile.py).
    x = _x(4)
    assert not any(p.requires_grad for p in counted.parameters()) and all(p.requires_grad for p in snn.parameters())
    assert not counted(x).requires_grad
    with torch.no_grad():
        assert torch.equal(counted(x), count_inference(snn, x))


def test_a_state_loaded_into_a_cast_network_keeps_the_network_dtype(qcfs_snn):
    ann, _ = qcfs_snn
    calib = [_x(16, seed=s) for s in range(2)]
    calibrated = ann2snn.Converter(ParallelConversionRecipe(T=2, dataloader=calib, method="ema",
                                                            progress=False)).convert(ann)
    # Rebuilt without calibration (scalar neuron parameters), cast, then loaded: the per-channel
    # shapes are adopted, the dtype is the network's.
    rebuilt = ann2snn.Converter(ParallelConversionRecipe(
        T=2, dataloader=calib, progress=False, calibration=CalibrationSettings(calibrate=False))).convert(ann).double()
    assert calibrated.q1.psi_da.shape == (8,) and rebuilt.q1.psi_da.shape == ()
    rebuilt.load_state_dict(calibrated.state_dict())
    assert {t.dtype for t in rebuilt.state_dict().values() if t.is_floating_point()} == {torch.float64}
    x = _x(4)
    assert torch.allclose(count_inference(rebuilt, x.double()), count_inference(calibrated, x).double(), atol=1e-4)


def test_save_refuses_a_channels_last_network_and_writes_nothing(qcfs_snn, tmp_path):
    _, snn = qcfs_snn
    snn = snn.to(memory_format=torch.channels_last)
    path = tmp_path / "snn.pt"
    with pytest.raises(ValueError, match=r"state entry 'c1.weight' has strides \(27, 1, 9, 3\), not those of a "
                                         r"contiguous tensor .*memory_format=torch.contiguous_format"):
        save_snn(snn, path)
    assert not path.exists()
    save_snn(snn.to(memory_format=torch.contiguous_format), path)
    assert path.exists()


def test_monitors_of_the_network_fire_in_its_count_domain_copy(qcfs_snn):
    """The behaviour count_domain_model's docstring and the quickstart warn about."""
    _, snn = qcfs_snn
    mon = monitor.OutputMonitor(snn, nn.Conv2d)
    spike_inference(snn, _x(2))
    assert [r.dim() for r in mon.records] == [5, 5]  # [T, N, C, H, W]
    count_inference(snn, _x(2))
    assert [r.dim() for r in mon.records] == [5, 5, 4, 4]
    mon.remove_hooks()
    count_inference(snn, _x(2))
    assert len(mon.records) == 4
