"""End-to-end conversion of the checked-in CIFAR-10 networks on real CIFAR-10 images.

Subsets keep the suite fast on two CPU cores; the full-test-set figures are in docs/results/.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional

from sj_parallel_conversion import (CalibrationSettings, NetworkSettings, ParallelConversionNode,
                                    ParallelConverter, count_inference, spike_inference)
from sj_parallel_conversion.tools import data, models
from sj_parallel_conversion.activation import QCFS
from sj_parallel_conversion.tools.compare import convert_builtin
from sj_parallel_conversion.inference import predictor
from sj_parallel_conversion.formulas import channel_view

pytestmark = pytest.mark.slow  # real CIFAR-10 conversions, examples and CLI runs

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "sj_parallel_conversion" / "tools" / "checkpoints"


@pytest.fixture(scope="module")
def cifar(cifar10_dir):
    test = data.cifar10_npz("test", root=cifar10_dir, limit=500)
    train = data.cifar10_npz("train", root=cifar10_dir, limit=2000)
    # Not shuffled: every test sees the same calibration batches whatever ran before it.
    calib = data.make_loader(train, 100)
    return test.tensors, calib


def _ckpt(name):
    m, _ = models.load_checkpoint(CKPT / name)
    return m.eval()


def _acc(logits, y):
    return (logits.argmax(1) == y).float().mean().item() * 100


def test_qcfs_T_equals_L_zero_prediction_differences(cifar):
    (x, y), _ = cifar
    ann = _ckpt("cifar10_cnn_qcfs_L4.pt")
    # T == L needs no calibration data: the converter must not ask for any.
    snn = ParallelConverter("parallel", T=4, progress=False).convert(copy.deepcopy(ann))
    with torch.no_grad():
        a = ann(x)
        c = count_inference(snn, x)
        s = spike_inference(snn, x[:100]).mean(0)
    assert torch.equal(a.argmax(1), c.argmax(1))
    assert torch.equal(a[:100].argmax(1), s.argmax(1))
    # Logits may differ slightly: BN folding changes float32 rounding, which can move an input
    # across a QCFS level boundary (see the neuron-count test below, run without folding).


def test_qcfs_T_equals_L_neuron_counts_match_ann_levels(cifar):
    """Every neuron's spike count equals the QCFS level of the ANN (the count of the lossless case),
    except where float32 rounding puts the input on a level boundary; those must be rare."""
    (x, _), _ = cifar
    x = x[:50]
    ann = _ckpt("cifar10_cnn_qcfs_L4.pt")
    snn = ParallelConverter("parallel", T=4, progress=False, network=NetworkSettings(fuse_bn=False)).convert(copy.deepcopy(ann))
    ann_levels, snn_counts = [], []
    hooks = [m.register_forward_hook(lambda m, i, o: ann_levels.append(
        torch.round(o / channel_view(m.theta, o.dim(), m.channel_dim) * m.L)))
        for m in ann.modules() if isinstance(m, QCFS)]
    hooks += [m.register_forward_hook(lambda m, i, o: snn_counts.append(
        (o != 0).sum(0).to(torch.float32))) for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    with torch.no_grad():
        ann(x)
        functional.reset_net(snn)
        spike_inference(snn, x)
    for h in hooks:
        h.remove()
    assert len(ann_levels) == len(snn_counts) == 5
    total = sum(t.numel() for t in ann_levels)
    diff = sum((a != s).sum().item() for a, s in zip(ann_levels, snn_counts))
    assert diff <= 1e-4 * total, f"{diff} of {total} neuron counts differ"


def test_relu_cnn_training_free_T32_within_1pt_and_beats_ltb_T16(cifar):
    (x, y), calib = cifar
    x, y = x[:300], y[:300]
    ann = _ckpt("cifar10_cnn_relu.pt")
    with torch.no_grad():
        ann_acc = _acc(ann(x), y)
        snn32 = ParallelConverter("parallel", T=32, dataloader=calib, method="ema", progress=False,
                                  calibration=CalibrationSettings(num_batches=10)).convert(copy.deepcopy(ann))
        snn16 = ParallelConverter("parallel", T=16, dataloader=calib, method="ema", progress=False,
                                  calibration=CalibrationSettings(num_batches=10)).convert(copy.deepcopy(ann))
        acc32 = _acc(count_inference(snn32, x), y)
        acc16 = _acc(count_inference(snn16, x), y)
        ltb = convert_builtin("ltb", ann, calib, 10, "cpu")
        ltb16 = _acc(predictor(ltb, 16)(x), y)
    assert acc32 >= ann_acc - 1.0, (ann_acc, acc32)
    assert acc16 > ltb16, (acc16, ltb16)


def test_relu_calibration_improves_short_runs(cifar):
    (x, y), calib = cifar
    ann = _ckpt("cifar10_cnn_relu.pt")
    kw = dict(T=4, dataloader=calib, progress=False)
    with torch.no_grad():
        plain = ParallelConverter("parallel", **kw, calibration=CalibrationSettings(num_batches=10, calibrate=False)
                                  ).convert(copy.deepcopy(ann))
        acc_plain = _acc(count_inference(plain, x), y)
        for method in ("ema", "moment"):
            cal = ParallelConverter("parallel", method=method, **kw, calibration=CalibrationSettings(num_batches=10)
                                    ).convert(copy.deepcopy(ann))
            acc_cal = _acc(count_inference(cal, x), y)
            assert acc_cal > acc_plain + 1.0, (method, acc_cal, acc_plain)


def test_bias_correction_changes_short_calibration_runs(cifar):
    """With 3 batches and alpha = 0.99 the raw EMAs hold only 1 - 0.99**3 = 3% of the statistic
    (batch-weighted); bias correction must undo that, so uncorrected offsets are about 30x smaller."""
    _, calib = cifar
    ann = _ckpt("cifar10_cnn_qcfs_L4.pt")
    kw = dict(T=2, dataloader=calib, progress=False, network=NetworkSettings(fuse_bn=False), method="ema")
    a = ParallelConverter("parallel", **kw, calibration=CalibrationSettings(num_batches=3)).convert(copy.deepcopy(ann))
    b = ParallelConverter("parallel", **kw, calibration=CalibrationSettings(num_batches=3, bias_correction=False)
                          ).convert(copy.deepcopy(ann))
    na = [m for m in a.modules() if isinstance(m, ParallelConversionNode)]
    nb = [m for m in b.modules() if isinstance(m, ParallelConversionNode)]
    ratios = [float((m2.psi_da.abs().sum() / m1.psi_da.abs().sum()).item()) for m1, m2 in zip(na, nb)
              if m1.psi_da.abs().sum() > 0]
    assert ratios
    assert all(0.01 < r < 0.1 for r in ratios), ratios


def test_count_domain_equals_spike_level_with_max_pool(cifar):
    (x, _), calib = cifar
    ann = _ckpt("cifar10_cnn_relu.pt")
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in ann.modules())
    snn = ParallelConverter("parallel", T=8, dataloader=calib, progress=False, method="ema",
                            calibration=CalibrationSettings(num_batches=2)).convert(ann)
    # float64: in float32 a different summation order can flip a count at a threshold boundary.
    snn, x = snn.double(), x[:64].double()
    with torch.no_grad():
        torch.testing.assert_close(count_inference(snn, x), spike_inference(snn, x).mean(0),
                                   rtol=1e-9, atol=1e-9)


def test_option_a_resnet20_converts_on_real_data(cifar):
    (x, _), calib = cifar
    torch.manual_seed(0)
    ann = models.build_model("resnet20", num_classes=10, act="relu").eval()
    snn = ParallelConverter("parallel", T=16, dataloader=calib, progress=False, method="ema",
                            calibration=CalibrationSettings(num_batches=2)).convert(ann)
    snn, x = snn.double(), x[:32].double()
    with torch.no_grad():
        c = count_inference(snn, x)
        s = spike_inference(snn, x).mean(0)
    assert c.shape == (32, 10)
    torch.testing.assert_close(c, s, rtol=1e-9, atol=1e-9)


def test_convert_cifar_example(cifar10_dir, tmp_path, load_example):
    out = tmp_path / "r.json"
    load_example("convert_cifar").main([
        "--checkpoint", str(CKPT / "cifar10_cnn_qcfs_L4.pt"), "--T", "4", "2", "--calib-batches", "2",
        "--limit-test", "200", "--data-root", str(cifar10_dir), "--count-domain", "--device", "cpu",
        "--json", str(out)])
    r = json.loads(out.read_text())
    rows = {row["T"]: row for row in r["rows"]}
    assert rows[4]["accuracy"] == r["ann_accuracy"] and not rows[4]["calibrated"]
    assert rows[2]["calibrated"] and 0.3 < rows[2]["accuracy"] <= 1.0


def test_imagenet_training_free_example_on_imagefolder(cifar10_dir, tmp_path, load_example):
    """The ImageNet example on a tiny ImageFolder made of CIFAR-10 images (no download)."""
    from PIL import Image

    with np.load(cifar10_dir / "test.npz") as z:
        xs, ys = z["x"][:60], z["y"][:60]
    for i, (img, lab) in enumerate(zip(xs, ys)):  # 40 evaluation images in val/, 20 for calibration in train/
        d = tmp_path / "folder" / ("val" if i < 40 else "train") / f"class{int(lab)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "r.json"
    load_example("imagenet_training_free").main([
        "--data-root", str(tmp_path / "folder"), "--calib-root", str(tmp_path / "folder"), "--num-classes", "10",
        "--T", "8", "--batch-size", "20", "--calib-images", "20", "--image-size", "64", "--count-domain",
        "--device", "cpu", "--json", str(out)])
    r = json.loads(out.read_text())
    assert [row["T"] for row in r["rows"]] == [8]
    # Every one of the 40 images was evaluated (random weights: the accuracy itself means nothing).
    for acc in (r["ann_accuracy"], r["rows"][0]["accuracy"]):
        assert abs(acc * 40 - round(acc * 40)) < 1e-9, acc


def test_per_layer_T_example(cifar10_dir, tmp_path, load_example):
    out = tmp_path / "r.json"
    rows = load_example("per_layer_T").main([
        "--checkpoint", str(CKPT / "cifar10_cnn_relu.pt"), "--T-max", "8", "--candidates", "2",
        "--calib-batches", "1", "--search-batches", "1", "--batch-size", "64", "--limit-test", "100",
        "--max-loss", "0.05", "--data-root", str(cifar10_dir), "--json", str(out)])
    r = json.loads(out.read_text())
    assert len(r["T"]) == 5 and set(r["T"].values()) <= {2, 8}
    assert 2 <= r["weighted_T"] <= 8
    assert [row[0] for row in rows] == ["ANN", "uniform T=8", "per-layer T", f"uniform T={round(r['weighted_T'])}"]


def test_cli_stats_on_converted_resnet20(cifar10_dir, tmp_path, capsys):
    """`sj-parallel stats` on the checked-in ResNet-20 converted with CIFAR-10 calibration:
    per-layer rates and nonzero SOPs at every site."""
    from sj_parallel_conversion.tools import cli

    out = tmp_path / "stats.json"
    code = cli.main(["stats", "--checkpoint", str(CKPT / "cifar10_resnet20_relu.pt"), "--T", "8", "--images", "16",
                     "--batch-size", "16", "--calib-images", "32", "--data-root", str(cifar10_dir), "--no-progress",
                     "--method", "ema", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    r = json.loads(out.read_text())
    neurons = [l for l in r["layers"] if l["kind"] == "neuron"]
    synapses = [l for l in r["layers"] if l["kind"] == "synapse"]
    assert len(neurons) == 19  # stem + 2 per block x 9 blocks
    assert all(0.0 < l["firing_rate"] <= 1.0 for l in neurons)
    assert r["total_sops"] > 0 and sum(l["sops_per_image"] > 0 for l in synapses) >= 19
    assert neurons[0]["name"] in printed


def test_cli_compare_on_resnet20_checkpoint(cifar10_dir, tmp_path, capsys):
    """The acceptance run of `sj-parallel compare` on a CIFAR-10 ResNet-20, on a subset: the
    table is printed, the plot and JSON are written, and the numbers tell the expected story
    (parallel close to the ANN at T=16, far above SpikingJelly's IF conversion at the same T)."""
    from sj_parallel_conversion.tools import cli

    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    code = cli.main(["compare", "--checkpoint", str(CKPT / "cifar10_resnet20_relu.pt"), "--T", "8", "16",
                     "--methods", "ann", "parallel-count", "rate-max", "--limit", "200", "--calib-images", "512",
                     "--method", "ema", "--repeats", "1",
                     "--data-root", str(cifar10_dir), "--no-progress", "--plot", str(png), "--json", str(js)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "parallel SNN (count-domain)" in printed and "SJ RateCodingRecipe max (IF)" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    rows = json.loads(js.read_text())["rows"]
    acc = {(r["method"], r["T"]): r["accuracy"] for r in rows}
    assert len(acc) == 5 and all(r["images"] == 200 for r in rows)
    assert acc[("ann", None)] > 0.8
    assert acc[("parallel-count", 16)] >= acc[("ann", None)] - 0.05
    assert acc[("parallel-count", 16)] > acc[("rate-max", 16)] + 0.2
