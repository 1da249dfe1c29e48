"""count_domain_model: an explicit one-pass module for the time-mean output of a converted network."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import ann2snn, functional, neuron

from sj_parallel_conversion import (
    QCFS,
    ParallelConversionNode,
    ParallelConverter,
    count_domain_model,
    count_inference,
    spike_inference,
)
from sj_parallel_conversion.inference import CountDomainNeuron
from sj_parallel_conversion.joins import TimeMean
from sj_parallel_conversion.network import ConvertedNetwork


class Residual(nn.Module):
    """Two activation sites whose trains are summed (per-layer T makes the sum a TimeMean join)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.a1 = nn.ReLU()
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.a2 = nn.ReLU()
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = self.a1(self.c1(x))
        z = self.a2(self.c2(y))
        return self.fc(F.avg_pool2d(z + y, 2).flatten(1))


class SharedInput(nn.Module):
    """The activation's input is also read by the output: the count domain must not overwrite it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.a1 = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.c1(x)
        return self.fc(self.a1(y).flatten(1)) + y.flatten(1)[:, :3]


class AliasedInput(nn.Module):
    """The activation reads its input through an alias (Identity, a reshape) that another node also reads."""

    def __init__(self, alias: str):
        super().__init__()
        self.alias = alias
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.same = nn.Identity()
        self.a1 = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.c1(x)
        z = self.same(y) if self.alias == "identity" else y.reshape(y.shape[0], 4, 8, 8)
        return self.fc(self.a1(z).flatten(1)) + y.flatten(1)[:, :3]


def _x(n=32, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _convert(ann, T=8):
    torch.manual_seed(0)
    return ParallelConverter("parallel", T=T, dataloader=[_x(64, 1)], progress=False, method="ema").convert(ann.eval())


def test_count_domain_model_is_a_separate_one_pass_module():
    snn = _convert(Residual())
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    cm = count_domain_model(snn)
    nodes = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    wrapped = [m for m in cm.modules() if isinstance(m, CountDomainNeuron)]
    assert len(wrapped) == len(nodes) == 2
    # every layer is single-step; the root reports no shared mode, since the wrapped nodes stay 'm'
    assert all(m.step_mode == "s" for m in cm.modules() if hasattr(m, "step_mode") and
               not isinstance(m, (ParallelConversionNode, ConvertedNetwork)))
    assert cm.step_mode is None
    # snn is untouched: still multi-step, same values, and no hidden attributes on its nodes
    assert all(m.step_mode == "m" for m in snn.modules() if hasattr(m, "step_mode"))
    assert all(torch.equal(before[k], v) for k, v in snn.state_dict().items())
    assert not any("count" in k for n in nodes for k in vars(n))
    x = _x()
    with torch.no_grad():
        y = cm(x)
    assert torch.equal(y, count_inference(snn, x))
    torch.testing.assert_close(y, spike_inference(snn, x).mean(0), rtol=1e-4, atol=1e-5)
    # a second call gives the same result (in-place neurons only overwrite their own inputs)
    with torch.no_grad():
        assert torch.equal(cm(x), y)


def test_in_place_only_where_the_neuron_is_the_sole_reader():
    snn = _convert(SharedInput())
    cm = count_domain_model(snn)
    (neuron_cd,) = [m for m in cm.modules() if isinstance(m, CountDomainNeuron)]
    assert not neuron_cd.inplace
    res = count_domain_model(_convert(Residual()))
    assert [m.inplace for m in res.modules() if isinstance(m, CountDomainNeuron)] == [True, True]
    # the shared input survives the neuron: the result equals the spike-level time mean
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), spike_inference(snn, x).mean(0), rtol=1e-4, atol=1e-5)
        # and forcing the neuron in place would corrupt it (so the check above can fail)
        neuron_cd.inplace = True
        assert not torch.allclose(cm(x), spike_inference(snn, x).mean(0), rtol=1e-4, atol=1e-5)


def test_lossless_qcfs_count_domain_reproduces_the_ann_bit_for_bit():
    torch.manual_seed(3)
    L = 4
    ann = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), QCFS(L, theta=1.3), nn.Linear(32, 16),
                        QCFS(L, theta=0.9), nn.Linear(16, 4)).eval()
    snn = _convert(copy.deepcopy(ann), T=L)
    x = _x(64)
    with torch.no_grad():
        assert torch.equal(count_domain_model(snn)(x), ann(x))


def test_per_layer_T_join_is_the_identity_in_the_count_domain():
    ann = Residual().eval()
    torch.manual_seed(0)
    snn = ParallelConverter("parallel", T={"a1": 8, "a2": 4}, dataloader=[_x(64, 1)],
                            progress=False, method="ema").convert(ann)
    assert any(isinstance(m, TimeMean) for m in snn.modules())
    cm = count_domain_model(snn)
    assert not any(isinstance(m, TimeMean) for m in cm.modules())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), spike_inference(snn, x).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="step_mode can only be"):
        TimeMean("s")


def test_rejections():
    with pytest.raises(ValueError, match="no ParallelConversionNode"):
        count_domain_model(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="expects an nn.Module"):
        count_domain_model(lambda x: x)
    mixed = nn.Sequential(nn.Linear(3, 3), ParallelConversionNode(4), neuron.IFNode(step_mode="m"))
    with pytest.raises(ValueError, match="IFNode"):
        count_domain_model(mixed)
    with pytest.raises(TypeError, match="wraps a ParallelConversionNode"):
        CountDomainNeuron(nn.ReLU())


def test_if_snn_has_no_count_domain():
    ann = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    snn_if = ann2snn.Converter(ann2snn.RateCodingRecipe([_x(16)], mode="max")).convert(copy.deepcopy(ann))
    functional.set_step_mode(snn_if, "m")
    with pytest.raises(ValueError, match="no ParallelConversionNode"):
        count_domain_model(snn_if)


@pytest.mark.parametrize("alias", ["identity", "reshape"])
def test_no_in_place_through_an_alias_of_a_tensor_others_read(alias):
    snn = _convert(AliasedInput(alias))
    cm = count_domain_model(snn)
    assert not any(m.inplace for m in cm.modules() if isinstance(m, CountDomainNeuron))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), spike_inference(snn, x).mean(0), rtol=1e-4, atol=1e-5)
