"""Conversion on synthetic models: graph coverage, rejections, API, lossless QCFS, calibration math."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import ann2snn, functional, monitor

from sj_parallel_conversion import (
    CalibrationSettings,
    ClipReLU,
    DistillCalibration,
    LearnedCalibration,
    GraphConversionError,
    NetworkSettings,
    ParallelConversionNode,
    ParallelConversionRecipe,
    ParallelConverter,
    QCFS,
    count_inference,
    parallel_neuron_factory,
    spike_inference,
)
from sj_parallel_conversion.activation import DAQCFS
from sj_parallel_conversion.observers import DACalibrator

torch.manual_seed(0)


class CoverageNet(nn.Module):
    """Every accepted pattern: BN, pool-before-act, F.relu, torch.relu, ReLU6, clamp, shared ReLU,
    option-A shortcut (strided slice + F.pad), residual add, concatenation, avg pools, dropout,
    view-flatten."""

    def __init__(self, act):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.a1 = act()
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.a2 = act()
        self.c3 = nn.Conv2d(16, 8, 1)
        self.a3 = act()
        self.shared = act()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(24 * 2 * 2, 10)

    def forward(self, x):
        y = self.a1(F.max_pool2d(self.bn1(self.c1(x)), 2))            # max pool placed before the activation
        short = F.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))           # option-A shortcut
        z = self.shared(self.c2(y) + short)                             # residual, then a shared module...
        w = self.shared(self.c3(z))                                     # ...called a second time
        u = torch.cat([z, self.a3(w)], dim=1)
        u = F.avg_pool2d(u, 2)
        u = self.drop(u)
        return self.fc(u.view(u.size(0), -1))


class FunctionalReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.r6 = nn.ReLU6()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.relu(self.c2(x)).clamp(0, 6.0)
        x = self.r6(self.c3(x)).relu()
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def _qcfs(L=4, theta=1.5):
    return lambda: QCFS(L, theta=theta)


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _loader(x, bs=32):
    return [(x[i:i + bs], torch.zeros(len(x[i:i + bs]), dtype=torch.long)) for i in range(0, len(x), bs)]


class ExplodingLoader:
    """Fails the test if anything iterates over it (errors must come before calibration)."""

    def __iter__(self):
        raise AssertionError("the converter started calibrating before rejecting the model")


# -- lossless QCFS, T == L ----------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 4, 7])
def test_qcfs_T_equals_L_is_lossless_in_float64(T):
    ann = _randomise_bn(CoverageNet(_qcfs(L=T, theta=1.5))).double()
    x = torch.randn(48, 3, 16, 16, dtype=torch.float64)
    snn = ann2snn.Converter(ParallelConversionRecipe(T, progress=False)).convert(ann)
    nodes = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    assert len(nodes) == 4  # a1, shared (twice: two nodes), a3
    with torch.no_grad():
        ref = ann(x)
    spikes = spike_inference(snn, x)
    assert spikes.shape == (T, 48, 10)
    # Exactly the ANN's output: every layer count matches the QCFS level in float64.
    torch.testing.assert_close(spikes.mean(0), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(count_inference(snn, x), ref, rtol=1e-12, atol=1e-12)


def test_uncalibrated_qcfs_T_not_L_differs_from_ann_but_calibration_needs_data():
    ann = CoverageNet(_qcfs(L=8)).eval()
    with pytest.raises(ValueError, match="dataloader"):
        ParallelConverter("parallel", T=4, progress=False).convert(ann)
    snn = ParallelConverter("parallel", T=4, progress=False, calibration=CalibrationSettings(calibrate=False)).convert(ann)
    x = torch.randn(16, 3, 16, 16)
    assert not torch.allclose(count_inference(snn, x), ann(x).detach())


# -- graph coverage -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_fn", [lambda: CoverageNet(nn.ReLU), FunctionalReLUNet])
def test_relu_patterns_convert_and_count_domain_matches_spikes(model_fn):
    # Seeded: with some weights a float32 current lands within rounding of a firing boundary and
    # the spike level flips one count (see docs/calibration.rst, exactness); the check is for the
    # conversion, not for that rounding.
    torch.manual_seed(0)
    ann = _randomise_bn(model_fn())
    x = torch.randn(64, 3, 16, 16)
    snn = ParallelConverter("parallel", T=8, dataloader=_loader(x), progress=False, method="ema").convert(ann)
    spikes = spike_inference(snn, x)
    counts = count_inference(snn, x)
    torch.testing.assert_close(spikes.mean(0), counts, rtol=1e-4, atol=1e-5)
    assert torch.equal(spikes.mean(0).argmax(1), counts.argmax(1))
    # Every output step carries spikes from sorted trains: outputs differ over time.
    assert spikes.shape[0] == 8


def test_relu6_and_clamp_become_clip_relu_with_recorded_max_capped():
    ann = FunctionalReLUNet().eval()
    x = torch.randn(32, 3, 8, 8) * 5
    rec = ParallelConversionRecipe(4, _loader(x), progress=False, calibration=CalibrationSettings(calibrate=False))
    snn = ann2snn.Converter(rec).convert(ann)
    nodes = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    assert len(nodes) == 5  # F.relu, torch.relu, clamp(0, 6), ReLU6, .relu()
    assert float(snn.get_submodule("relu").v_threshold.max()) > 6.0  # uncapped ReLU: the raw maximum
    for capped in ("clamp", "r6"):
        th = snn.get_submodule(capped).v_threshold
        assert float(th.max()) <= 6.0


def test_shared_module_calls_get_separate_thresholds():
    ann = CoverageNet(nn.ReLU).eval()
    x = torch.randn(32, 3, 16, 16)
    snn = ParallelConverter("parallel", T=4, dataloader=_loader(x), progress=False, method="ema").convert(ann)
    names = [n for n, m in snn.named_modules() if isinstance(m, ParallelConversionNode)]
    assert "shared" in names and "shared_1" in names
    a, b = snn.get_submodule("shared"), snn.get_submodule("shared_1")
    # The first call sees c2's 16 channels, the second c3's 8: one threshold per channel of each.
    assert a.v_threshold.shape == (16,) and b.v_threshold.shape == (8,)


# -- rejections -------------------------------------------------------------------------------
class Sig(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.act = nn.Sigmoid()
        self.r = nn.ReLU()

    def forward(self, x):
        return self.r(self.act(self.c(x)))


class Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()

    def forward(self, x):
        y = self.r(self.c(x))
        return y * y


class PoolOfCurrents(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        y = self.r(self.c(x))
        return self.pool(self.c2(y) + y)


class Inner(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class FunctionInSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.block = Inner()
        self.r = nn.ReLU()

    def forward(self, x):
        return self.r(self.block(self.c(x)))


class Method(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()

    def forward(self, x):
        return self.r(self.c(x)).exp()


class ReflectPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()

    def forward(self, x):
        return F.pad(self.r(self.c(x)), (1, 1, 1, 1), mode="reflect")


class PoolWithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        return self.pool(self.r(self.c(x)))[0]


@pytest.mark.parametrize("model, pattern", [
    (Sig(), r"'act'.*Sigmoid"),
    (PoolWithIndices(), r"'pool'.*max pooling with return_indices"),
    (Product(), r"graph node 'mul'.*product of two tensors"),
    (PoolOfCurrents(), r"graph node 'pool'.*max pooling of analog currents"),
    (FunctionInSubmodule(), r"graph node 'sin'.*in module block \(Inner\).*function sin"),
    (Method(), r"graph node 'exp'.*\.exp\(\)"),
    (ReflectPad(), r"graph node 'pad'.*function pad"),
])
def test_unsupported_patterns_rejected_before_calibration(model, pattern):
    with pytest.raises(GraphConversionError, match=pattern):
        ParallelConverter("parallel", T=4, dataloader=ExplodingLoader(), progress=False).convert(model.eval())


class MixedSites(nn.Module):
    """A QCFS site (q) followed by a ReLU site (r)."""

    def __init__(self):
        super().__init__()
        self.l1, self.q, self.l2, self.r = nn.Linear(4, 4), QCFS(4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.r(self.l2(self.q(self.l1(x))))


def test_mixed_qcfs_and_relu_rejected_with_site_names():
    with pytest.raises(ValueError, match=r"mixes QCFS sites \(q.*ReLU sites \(r"):
        ParallelConverter("parallel", T=4, dataloader=ExplodingLoader(), progress=False).convert(MixedSites())


@pytest.mark.parametrize("mode, wrong", [("qcfs", "r"), ("relu", "q")])
def test_mode_must_match_every_site(mode, wrong):
    with pytest.raises(ValueError, match=rf"mode='{mode}' but activation sites \['{wrong}'\] are of the other kind"):
        ParallelConverter("parallel", T=4, dataloader=ExplodingLoader(), progress=False,
                          mode=mode).convert(MixedSites())


@pytest.mark.parametrize("method", ["ema", "distill"])
def test_the_converter_leaves_the_ann_untouched(method):
    """quickstart.rst: BN folding, threshold recording, calibration and the fit of the weights all
    work on a copy; the ANN keeps its modules, state, mode and outputs."""
    torch.manual_seed(0)
    ann = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                      nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))).eval()
    x = torch.randn(64, 3, 8, 8)
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    kinds = [type(m) for m in ann.modules()]
    with torch.no_grad():
        out = ann(x)
    ann.train()  # converted in eval mode, handed back in the mode it came in
    calibration = CalibrationSettings(distill=DistillCalibration(steps=5, views=0, max_images=64))
    snn = ParallelConverter("parallel", T=4, dataloader=list(torch.split(x, 32)), method=method,
                            calibration=calibration, progress=False).convert(ann)
    assert snn is not ann and any(isinstance(m, ParallelConversionNode) for m in snn.modules())
    assert [type(m) for m in ann.modules()] == kinds and all(m.training for m in ann.modules())
    ann.eval()
    after = ann.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(ann(x), out)


def test_model_without_activation_rejected():
    with pytest.raises(ValueError, match="no ReLU or QCFS activation"):
        ParallelConverter("parallel", T=4, dataloader=ExplodingLoader(), progress=False).convert(
            nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))


# -- API ------------------------------------------------------------------------------------
def test_converter_api_errors():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*parallel"):
        ParallelConverter("nope")
    with pytest.raises(TypeError, match="only accepted with a recipe name"):
        ParallelConverter(ParallelConversionRecipe(4), T=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="T must be an integer >= 1"):
            ParallelConversionRecipe(bad)
    with pytest.raises(ValueError, match="alpha"):
        ParallelConversionRecipe(4, calibration=CalibrationSettings(alpha=1.0))
    with pytest.raises(ValueError, match="mode"):
        ParallelConversionRecipe(4, mode="lif")
    with pytest.raises(ValueError, match="records per-channel maxima.*dataloader"):
        ParallelConverter("parallel", T=4).convert(CoverageNet(nn.ReLU).eval())


def test_recipe_settings_are_checked_where_they_are_grouped():
    from sj_parallel_conversion.recipe import with_calibration

    for settings, match in ((CalibrationSettings(alpha=1.0), "alpha"), (CalibrationSettings(num_batches=0), "num_batches"),
                            (CalibrationSettings(calibrate="yes"), "calibrate"),
                            (CalibrationSettings(skip_agreement=1.5), "skip_agreement"),
                            (CalibrationSettings(selection_fraction=None), "selection_fraction"),
                            (CalibrationSettings(selection_blends=-1), "selection_blends"),
                            (CalibrationSettings(selection_blends=True), "selection_blends")):
        with pytest.raises(ValueError, match=match):
            ParallelConversionRecipe(4, calibration=settings)
    for settings, match in ((NetworkSettings(backend="gpu"), "backend"), (NetworkSettings(spike_order="middle"), "order"),
                            (NetworkSettings(fuse_bn="no"), "fuse_bn")):
        with pytest.raises(ValueError, match=match):
            ParallelConversionRecipe(4, network=settings)
    with pytest.raises(TypeError, match="inplace"):
        ParallelConversionRecipe(4, network=NetworkSettings(inplace=1))
    with pytest.raises(TypeError, match="calibration must be a CalibrationSettings"):
        ParallelConversionRecipe(4, calibration=NetworkSettings())
    with pytest.raises(TypeError, match="learned must be a LearnedCalibration"):
        ParallelConversionRecipe(4, calibration=CalibrationSettings(learned={"steps": 3}))
    # One method's options given for the other would run that method under this one's name.
    with pytest.raises(TypeError, match="learned must be a LearnedCalibration, got DistillCalibration"):
        ParallelConversionRecipe(4, calibration=CalibrationSettings(learned=DistillCalibration()))
    with pytest.raises(TypeError, match="distill must be a DistillCalibration, got LearnedCalibration"):
        ParallelConversionRecipe(4, calibration=CalibrationSettings(distill=LearnedCalibration()))
    for value in ("no", None, 1):
        with pytest.raises(ValueError, match="bias_correction must be True or False"):
            ParallelConversionRecipe(4, calibration=CalibrationSettings(bias_correction=value))
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        ParallelConversionRecipe(4, alpha=0.9)  # the settings are grouped, not flat keywords
    assert NetworkSettings(analog_sites=["relu"]).analog_sites == ("relu",)
    # with_calibration changes a copy of the settings it is given, and only the fields named
    given = {"method": "ema", "calibration": CalibrationSettings(alpha=0.5)}
    out = with_calibration(given, num_batches=3)
    assert out["calibration"] == CalibrationSettings(alpha=0.5, num_batches=3) and out["method"] == "ema"
    assert given["calibration"].num_batches is None
    assert with_calibration(None, calibrate=False) == {"calibration": CalibrationSettings(calibrate=False)}


def test_converter_builds_the_recipe_from_its_name():
    conv = ParallelConverter("parallel", T=3, progress=False)
    assert isinstance(conv.recipe, ParallelConversionRecipe) and conv.recipe.T == 3


def test_per_layer_T_dict():
    ann = CoverageNet(_qcfs(L=4)).eval().double()
    rec = ParallelConversionRecipe({"a1": 4, "a3": 4}, default_T=4, progress=False)
    snn = ann2snn.Converter(rec).convert(ann)
    assert sorted(n.T for n in snn.modules() if isinstance(n, ParallelConversionNode)) == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="unknown activation sites"):
        ann2snn.Converter(ParallelConversionRecipe({"nope": 4}, default_T=4)).convert(ann)
    with pytest.raises(ValueError, match="no entry for activation site"):
        ann2snn.Converter(ParallelConversionRecipe({"a1": 4})).convert(ann)


def test_state_dict_round_trip_and_spikingjelly_utilities():
    ann = _randomise_bn(CoverageNet(nn.ReLU))
    x = torch.randn(32, 3, 16, 16)
    snn = ParallelConverter("parallel", T=4, dataloader=_loader(x), progress=False, method="ema").convert(ann)
    ref = count_inference(snn, x)
    # Rebuild the structure without calibration, then load the calibrated state.
    fresh = ParallelConverter("parallel", T=4, dataloader=_loader(x[:8]), progress=False,
                              calibration=CalibrationSettings(calibrate=False)).convert(CoverageNet(nn.ReLU).eval())
    fresh.load_state_dict(snn.state_dict())
    torch.testing.assert_close(count_inference(fresh, x), ref)
    # SpikingJelly utilities.
    functional.set_step_mode(fresh, "m")
    functional.reset_net(fresh)
    mon = monitor.OutputMonitor(fresh, ParallelConversionNode)
    out = fresh(x.unsqueeze(0).repeat(4, 1, 1, 1, 1))
    assert out.shape == (4, 32, 10) and len(mon.records) == 4
    for rec in mon.records:
        k = (rec > 0).sum(0)
        first = (rec > 0).float().argmax(0)
        # sorted trains: the first spike sits at T - k wherever the neuron fires
        assert torch.equal(first[k > 0], (4 - k)[k > 0])
    mon.remove_hooks()


def test_rate_coding_neuron_factory_matches_uncalibrated_recipe():
    """SpikingJelly's RateCodingRecipe with our neuron equals ClipReLU -> uncalibrated DA-QCFS."""
    ann = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 4 * 4, 5)).eval().double()
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    one_batch = [x]
    sj = ann2snn.Converter(ann2snn.RateCodingRecipe(one_batch, channel_wise=True,
                                                    neuron_factory=parallel_neuron_factory(8))).convert(ann)
    assert sum(isinstance(m, ParallelConversionNode) for m in sj.modules()) == 2
    ours = ParallelConverter("parallel", T=8, dataloader=one_batch, progress=False,
                             calibration=CalibrationSettings(calibrate=False)).convert(ann)
    functional.set_step_mode(sj, "m")
    a = spike_inference(sj, x, 8).mean(0)
    b = spike_inference(ours, x).mean(0)
    # SpikingJelly's scalers hold 1/theta and theta separately (rounding ~1e-7 relative); the
    # spike counts and hence the outputs agree up to that.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.argmax(1), b.argmax(1))


# -- calibration mechanics ----------------------------------------------------------------------
def test_da_calibrator_recovers_a_known_shift_with_bias_correction():
    """z_cal = z_ref - 0.3 per channel: psi_da must become 0.3 after one batch when debiased."""
    ref = ClipReLU(torch.full((3,), 2.0))
    z_ref = torch.rand(64, 3, 5, 5) * 2
    z = torch.cat([z_ref, z_ref - torch.tensor([0.3, 0.0, -0.2]).view(1, 3, 1, 1)])
    cal = DACalibrator(ref, ref.to_daqcfs(16), alpha=0.99, bias_correction=True)
    cal(z)
    torch.testing.assert_close(cal.da.psi_da, torch.tensor([0.3, 0.0, -0.2]), rtol=0, atol=1e-6)
    raw = DACalibrator(ref, ref.to_daqcfs(16), alpha=0.99, bias_correction=False)
    raw(z)
    torch.testing.assert_close(raw.da.psi_da, torch.tensor([0.003, 0.0, -0.002]), rtol=0, atol=1e-7)
    # A second batch of the same data: the debiased average of a constant shift stays put, and the
    # output is the reference activation (clip to [0, 2]) on the first half and paper Eq. 9 with
    # the updated parameters on the second, both written out here.
    out = cal(z)
    torch.testing.assert_close(cal.da.psi_da, torch.tensor([0.3, 0.0, -0.2]), rtol=0, atol=1e-6)
    z_cal = z[64:]
    torch.testing.assert_close(out[:64], z_ref.clamp(0.0, 2.0))
    psi, phi = cal.da.psi_da.view(1, 3, 1, 1), cal.da.phi_da.view(1, 3, 1, 1)
    k = torch.floor(((z_cal + psi) * 16 + 0.5 * 2.0) / 2.0).clamp(0, 16)
    torch.testing.assert_close(out[64:], (2.0 + phi) / 16 * k)


@pytest.mark.parametrize("method", ["ema", "moment"])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_da_calibrator_matches_algorithm_1_written_out(method, channel_dim):
    """Two batches through the calibrator against Algorithm 1 written out with plain tensors: psi
    from the mean input gap, phi from the mean output gap measured with the previous phi (ema),
    or phi = sum(e) / sum(q) over all batches (moment); channel axis second or last. The
    differences are formed in float32 and averaged in float64, as the calibrator does, so the
    float32 parameters must agree exactly (a sum in float32 would change their last bits)."""
    T, alpha, C = 4, 0.9, 16
    g = torch.Generator().manual_seed(3)
    theta = torch.rand(C, generator=g) * 2 + 0.5
    ref = ClipReLU(theta, channel_dim=channel_dim)
    cal = DACalibrator(ref, ref.to_daqcfs(T), alpha=alpha, bias_correction=True, method=method)
    shape = (16, C, 4, 4) if channel_dim == 1 else (16, 4, 4, C)
    view = (lambda t: t.view(1, C, 1, 1)) if channel_dim == 1 else (lambda t: t.view(1, 1, 1, C))
    dims = (0, 2, 3) if channel_dim == 1 else (0, 1, 2)
    mean = lambda t: t.double().sum(dims) / (t.numel() // C)  # noqa: E731
    th = view(theta)
    psi_avg = phi_avg = torch.zeros(C, dtype=torch.float64)
    phi = torch.zeros(C)
    num = den = torch.zeros(C, dtype=torch.float64)
    for n in (1, 2):
        z_ref = torch.rand(shape, generator=g) * 3 - 0.5
        z_cal = z_ref + torch.randn(shape, generator=g) * 0.2
        out = cal(torch.cat([z_ref, z_cal]))
        if method == "ema":
            psi_avg = alpha * psi_avg + (1 - alpha) * mean(z_ref - z_cal)
            psi = (psi_avg / (1 - alpha ** n)).float()
        else:
            gap = mean(z_ref - z_cal)
            psi64 = gap if n == 1 else psi64 + (gap - psi64) / n
            psi = psi64.float()
        k = torch.clamp(torch.floor(((z_cal + view(psi)) * T + 0.5 * th) / th), 0, T)
        r = torch.minimum(z_ref.clamp(min=0), th)
        if method == "ema":
            phi_avg = alpha * phi_avg + (1 - alpha) * mean(r - (th + view(phi)) / T * k)
            phi = (phi_avg / (1 - alpha ** n)).float()
        else:
            zero_phi = th / T * k
            num = num + (r - zero_phi).double().sum(dims)
            den = den + (zero_phi / th).double().sum(dims)
            phi = torch.maximum(num / den, -0.9 * theta.double()).float()
        assert torch.equal(cal.da.psi_da, psi), (n, cal.da.psi_da - psi)
        assert torch.equal(cal.da.phi_da, phi), (n, cal.da.phi_da - phi)
        assert torch.equal(out[:16], r) and torch.equal(out[16:], (th + view(phi)) / T * k)


def test_da_calibrator_keeps_the_reference_dtype_and_works_with_gradients_on():
    """A float32 per-channel threshold promotes a bfloat16 input: the output error is averaged in
    float32 (not rounded to the input's dtype first); and outside torch.no_grad(), with a QCFS
    whose threshold is a Parameter, the calibrator gives what it gives without gradients."""
    torch.manual_seed(0)
    ref = QCFS(L=8, theta=torch.tensor([1.3, 0.7, 2.1]))
    cal = DACalibrator(ref, ref.to_daqcfs(4))
    z = torch.randn(64, 3).bfloat16()
    z_cal = z + 0.1
    with torch.no_grad():
        out = cal(torch.cat([z, z_cal]))
        psi = cal.da.psi_da.clone()
        written = DAQCFS(4, ref.to_daqcfs(4).theta, psi_da=psi)(z_cal)  # phi_da was 0 when measured
        diff = ref(z) - written
    assert diff.dtype == torch.float32 and out.dtype == torch.float32
    expected = diff.double().mean(0).float()  # one debiased step of the average is the mean itself
    torch.testing.assert_close(cal.da.phi_da, expected, rtol=0, atol=1e-7)

    plain = QCFS(L=8, theta=2.0)
    assert isinstance(plain.theta, nn.Parameter) and plain.theta.requires_grad
    x = torch.randn(8, 3)
    on = DACalibrator(plain, plain.to_daqcfs(4))
    off = copy.deepcopy(on)
    y_on = on(torch.cat([x, x * 0.9]))
    with torch.no_grad():
        y_off = off(torch.cat([x, x * 0.9]))
    torch.testing.assert_close(y_on.detach(), y_off, rtol=0, atol=0)
    assert torch.equal(on.da.phi_da, off.da.phi_da) and torch.equal(on.da.psi_da, off.da.psi_da)


@pytest.mark.parametrize("method", ["ema", "moment"])
def test_da_calibration_reduces_layer_error(method):
    """After calibration the DA-QCFS output mean is closer to the reference mean per channel."""
    ref = ClipReLU(torch.tensor([1.0, 3.0]))
    cal = DACalibrator(ref, ref.to_daqcfs(4), alpha=0.9, bias_correction=True, method=method)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        z = torch.rand(256, 2, generator=g) ** 4 * torch.tensor([1.5, 4.0])
        cal(torch.cat([z, z]))
    # Mass near 0 (a ReLU-like distribution): T=4 levels lose a lot there without calibration.
    z = torch.rand(4096, 2, generator=g) ** 4 * torch.tensor([1.5, 4.0])
    before = (ref(z) - ref.to_daqcfs(4)(z)).mean(0).abs()
    after = (ref(z) - cal.da(z)).mean(0).abs()
    assert (after < before).all(), (before, after)
    if method == "moment":  # moment matching removes the mean error on the data it saw
        assert (after < 0.25 * before).all(), (before, after)


def test_analog_sites_stay_relu_and_must_precede_all_spiking_sites():
    from sj_parallel_conversion.graph import AnalogReLU

    ann = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(36, 3)).eval()
    x = torch.randn(32, 3, 8, 8)
    snn = ParallelConverter("parallel", T=8, dataloader=[x], progress=False, method="ema",
                            network=NetworkSettings(analog_sites=["1"])).convert(ann)
    assert isinstance(snn.get_submodule("1"), AnalogReLU)
    assert isinstance(snn.get_submodule("4"), ParallelConversionNode)
    torch.testing.assert_close(spike_inference(snn, x).mean(0), count_inference(snn, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(GraphConversionError, match="spiking site '1' precedes it"):
        ParallelConverter("parallel", T=8, dataloader=ExplodingLoader(), network=NetworkSettings(analog_sites=["4"])).convert(ann)
    with pytest.raises(ValueError, match="not an activation site"):
        ParallelConverter("parallel", T=8, dataloader=ExplodingLoader(), network=NetworkSettings(analog_sites=["0"])).convert(ann)


def test_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="method='ema' does not apply with CalibrationSettings\\(calibrate=False\\)"):
        ParallelConversionRecipe(4, method="ema", calibration=CalibrationSettings(calibrate=False))
    ParallelConversionRecipe(4, calibration=CalibrationSettings(calibrate=False))  # the default method
    with pytest.raises(ValueError, match="default_T=8 applies only to a per-layer T dict"):
        ParallelConversionRecipe(4, default_T=8)


def test_calibration_inputs_the_fits_cannot_hold_are_refused_clearly():
    ann = CoverageNet(nn.ReLU).eval()
    two = [torch.randn(2, 3, 16, 16)]
    with pytest.raises(ValueError, match="holds 2 image\\(s\\); method='auto' needs at least 3"):
        ParallelConverter("parallel", T=4, dataloader=two, progress=False).convert(ann)
    mixed = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 20, 20)]
    with pytest.raises(ValueError, match="inputs of 2 shapes \\(\\(3, 16, 16\\), \\(3, 20, 20\\)"):
        ParallelConverter("parallel", T=4, dataloader=mixed, progress=False, method="distill").convert(ann)


class _Stream:
    """Like a DataLoader over a streaming dataset: every iterator continues where the last stopped."""

    def __init__(self, batches):
        self.left = list(batches)

    def __iter__(self):
        while self.left:
            yield self.left.pop(0)


def test_a_loader_that_can_be_read_only_once_is_named_as_such():
    batches = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    with pytest.raises(ValueError, match="yielded 3 batch\\(es\\) on an earlier pass and 0 on this one: it can "
                                         "be read only once"):
        ParallelConverter("parallel", T=4, dataloader=_Stream(batches), progress=False,
                          method="ema").convert(CoverageNet(nn.ReLU).eval())
    # The same batches as a generator are read once and kept.
    ParallelConverter("parallel", T=4, dataloader=(b for b in batches), progress=False,
                      method="ema").convert(CoverageNet(nn.ReLU).eval())
