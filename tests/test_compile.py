"""The neuron as the torch.library operator sj_parallel_conversion::fire, and torch.compile of
converted networks (spike level and count domain) in one graph."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

from sj_parallel_conversion import ParallelConversionNode, ParallelConverter, count_domain_model, spike_inference
from sj_parallel_conversion.kernels import fire_checked_op, fire_op, use_backend
from sj_parallel_conversion.tools.models import build_model


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def _x(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_opcheck_fire():
    g = torch.Generator().manual_seed(0)
    theta = torch.rand(5, generator=g) + 0.5
    # per-channel parameters, T_in != T, late order
    args = (torch.randn(3, 4, 5, 6, generator=g), 4, theta, theta / 2, torch.tensor(0.1), theta * 1.1, 1, True)
    torch.library.opcheck(fire_op, args)
    torch.library.opcheck(fire_checked_op, args)
    # channels-last steps: the output keeps the layout (the fake implementation says so too)
    x_cl = torch.randn(2 * 4, 5, 3, 6, generator=g).contiguous(memory_format=torch.channels_last).view(2, 4, 5, 3, 6)
    torch.library.opcheck(fire_op, (x_cl,) + args[1:])


def test_channels_last_steps_stay_channels_last():
    node = ParallelConversionNode(5, v_threshold=torch.tensor([0.5, 1.0, 2.0]), psi_da=0.1)
    x = torch.randn(3 * 4, 3, 6, 7).contiguous(memory_format=torch.channels_last).view(3, 4, 3, 6, 7)
    y = node(x)
    assert y[0].is_contiguous(memory_format=torch.channels_last) and not y[0].is_contiguous()
    assert torch.equal(y, node(x.contiguous()))


def test_op_is_what_the_node_runs_and_backward_raises():
    node = ParallelConversionNode(4, v_threshold=torch.tensor([0.5, 1.0, 2.0]), psi_da=0.1)
    x = torch.randn(2, 6, 3, 5)
    with use_backend("torch"):
        y = fire_op(x, 4, node.v_threshold, node.psi, node.psi_da, node.spike_value, 1, True)
    assert torch.equal(y, node(x))
    xr = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        node(xr).sum().backward()


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1, 2, 3, 4, dtype=torch.float64)
        out = ParallelConversionNode(7).to(torch.float64)(x)
    assert out.shape == (7, 2, 3, 4) and out.dtype == torch.float64


def test_compile_fullgraph_aot_eager_equals_eager():
    torch._dynamo.reset()
    calib = [_x(32, 1)]
    snn = ParallelConverter("parallel", T=6, dataloader=calib, progress=False, method="ema").convert(_cnn())
    x = _x(8)
    x_seq = x.unsqueeze(0)  # the image fed once (T_in = 1), as spike_inference does
    with torch.no_grad():
        eager = snn(x_seq)
        compiled = torch.compile(snn, fullgraph=True, backend="aot_eager")(x_seq)
        assert eager.shape[0] == 6 and torch.equal(compiled, eager)
    # The count domain with gradients enabled, as a plain call runs it (snn's parameters require
    # grad): still one graph.
    cm = count_domain_model(snn)
    assert torch.equal(torch.compile(cm, fullgraph=True, backend="aot_eager")(x), cm(x))


def _compiler_missing():
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("g++") is None:
        return "no C compiler for torch.compile's inductor backend"
    return None


@pytest.mark.slow  # inductor compiles C++ for a ResNet-20: minutes on a 2-core box
@pytest.mark.skipif(_compiler_missing() is not None, reason=str(_compiler_missing()))
def test_compile_inductor_resnet20_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    ann = build_model("resnet20", num_classes=10, act="relu").eval()
    snn = ParallelConverter("parallel", T=4, dataloader=[torch.randn(32, 3, 32, 32)], progress=False,
                            method="ema").convert(ann)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = spike_inference(snn, x)
        compiled = torch.compile(snn, fullgraph=True)(x.unsqueeze(0))
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        cm = count_domain_model(snn)
        torch.testing.assert_close(torch.compile(cm, fullgraph=True)(x), cm(x), rtol=1e-4, atol=1e-4)


def test_nan_calibration_activations_are_rejected_at_conversion():
    # The node does not check for NaN at run time by default (no host sync); conversion does.
    # Finite images, a NaN weight.
    ann = _cnn()
    with torch.no_grad():
        ann[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN activations at activation site '2'"):
        ParallelConverter("parallel", T=4, dataloader=[_x(16, 1)], progress=False, method="ema").convert(ann)
    # An infinite weight where no zero meets it (no padding): infinite, not NaN, activations.
    ann = _cnn()
    ann[0].padding = (0, 0)
    with torch.no_grad():
        ann[0].weight.abs_()
        ann[0].weight[:, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinite activations at activation site '2'"):
        ParallelConverter("parallel", T=4, dataloader=[_x(16, 1).abs()], progress=False, method="ema").convert(ann)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["ema", "mse", "distill", "auto"])
def test_calibration_images_with_nan_or_inf_are_refused_naming_the_batch(value, method):
    # A QCFS network at T != L has no threshold recording (where a ReLU network's NaN check
    # sits): the images themselves are checked as each batch is read, before any fit.
    from sj_parallel_conversion import QCFS
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), QCFS(L=4, theta=1.0), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10)).eval()
    batches = [_x(16, 1), _x(16, 2)]
    batches[1][3, 0, 5, 5] = value
    with pytest.raises(ValueError, match=r"calibration batch 1 holds 1 NaN or infinite value\(s\) of 12288"):
        ParallelConverter("parallel", T=8, dataloader=batches, progress=False, method=method).convert(ann)
