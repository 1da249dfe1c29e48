"""Learned calibration, the auto default, and calibration data handling (synthetic models)."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn as nn

from sj_parallel_conversion import (CalibrationSettings, ParallelConversionNode, ParallelConverter,
                                    count_inference, spike_inference)
from sj_parallel_conversion import formulas, selection
from sj_parallel_conversion.activation import DAQCFS, QCFS, ClipReLU
from sj_parallel_conversion.learned import (DistillCalibration, LearnedCalibration, LearnedSite, distillation_kl,
                                            held_out_score, split_images)
from sj_parallel_conversion.augment import blends
from sj_parallel_conversion.recipe import SELECTION_SEED, ParallelConversionRecipe
from sj_parallel_conversion.selection import CalibrationReport, choose, clearly_better, irreplaceable

# From the uncalibrated start with a large rate: a fit that visibly moves in a few steps.
FAST = LearnedCalibration(steps=40, lr=1e-2, start="none", eval_every=10, patience=10, batch_size=32)
FAST_DISTILL = DistillCalibration(steps=40, eval_every=10, patience=10, batch_size=32)


def _net(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10)).eval()


def _weak_net():
    """:func:`_net` with its last bias zeroed: its logits then follow the activations, so at
    ``T = 1`` no calibration misses most images and every candidate of ``auto`` is measured."""
    ann = _net()
    with torch.no_grad():
        ann[-1].bias.zero_()
    return ann


def _batches(n=6, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g) for _ in range(n)]


# -- the learnable site ----------------------------------------------------------------------------
def test_learned_site_starts_at_uncalibrated_daqcfs_and_has_straight_through_gradients():
    theta = torch.tensor([0.5, 1.0, 2.0])
    site = LearnedSite(ClipReLU(theta), T=4)
    x = torch.linspace(-1, 3, 3 * 40).reshape(40, 3)
    y = site(x)
    # Independent formulation: theta/T * clip(floor((x*T + theta/2)/theta), 0, T) per channel.
    ref = theta / 4 * torch.clamp(torch.floor((x * 4 + theta / 2) / theta), 0, 4)
    assert torch.equal(y, ref)
    y.sum().backward()
    for p in (site.log_pre, site.log_post, site.psi_da_rel):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_learned_site_from_qcfs_broadcasts_its_scalar_threshold_per_channel():
    site = LearnedSite(QCFS(L=8, theta=3.0), T=4)
    x = torch.randn(5, 6, 2, 2)
    site(x)
    assert site.log_pre.shape == (6,)
    da = site.to_daqcfs()
    assert isinstance(da, DAQCFS) and da.theta.shape == (6,) and torch.allclose(da.theta, torch.full((6,), 3.0))
    assert torch.equal(da(x), site(x).detach())


def test_thresholds_stay_positive_and_bounded_whatever_the_learning_rate():
    batches = _batches()
    snn = ParallelConverter("parallel", T=2, dataloader=batches, progress=False, method="learned",
                            calibration=CalibrationSettings(learned=LearnedCalibration(steps=20, lr=50.0, eval_every=5, patience=20))).convert(_net())
    for m in snn.modules():
        if isinstance(m, ParallelConversionNode):
            assert bool((m.v_threshold > 0).all()) and bool((m.spike_value > 0).all())
            assert bool(torch.isfinite(m.v_threshold).all()) and bool(torch.isfinite(m.psi_da).all())


# -- the converted result ---------------------------------------------------------------------------
def test_learned_result_is_the_parallel_snn_and_improves_the_held_out_fit():
    batches = _batches()
    ann = _net()
    snn = ParallelConverter("parallel", T=2, dataloader=batches, progress=False, method="learned",
                            calibration=CalibrationSettings(learned=FAST)).convert(ann)
    assert not any(isinstance(m, LearnedSite) for m in snn.modules())
    nodes = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    assert len(nodes) == 2 and all(n.v_threshold.numel() > 1 for n in nodes)
    hist = snn.calibration_report.learned
    start_kl = hist["held_out_kl"][0][1]
    kept_kl = dict(hist["held_out_kl"])[hist["kept_step"]]
    assert hist["kept_step"] > 0 and kept_kl < 0.9 * start_kl
    # The kept KL is that of the final spiking network, measured independently here.
    fit, held = split_images(batches, FAST.holdout)
    with torch.no_grad():
        kl = sum(float(nn.functional.kl_div(count_inference(snn, x).log_softmax(1), ann(x).log_softmax(1),
                                            log_target=True, reduction="sum")) for x in held)
    assert kl / sum(x.shape[0] for x in held) == pytest.approx(kept_kl, rel=1e-3, abs=1e-6)
    # Spike level equals the count domain (float64: no rounding ties).
    snn64 = snn.double()
    x = held[0].double()
    torch.testing.assert_close(spike_inference(snn64, x).mean(0), count_inference(snn64, x), rtol=0, atol=1e-10)


def test_learned_is_deterministic_for_a_seed():
    batches = _batches()
    a = ParallelConverter("parallel", T=2, dataloader=batches, progress=False, method="learned",
                          calibration=CalibrationSettings(learned=FAST)).convert(_net()).state_dict()
    b = ParallelConverter("parallel", T=2, dataloader=batches, progress=False, method="learned",
                          calibration=CalibrationSettings(learned=FAST)).convert(_net()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_learned_calibration_of_a_qcfs_network_at_T_not_L():
    batches = _batches()
    snn = ParallelConverter("parallel", T=2, dataloader=batches, progress=False, method="learned",
                            calibration=CalibrationSettings(learned=FAST)).convert(_net(lambda: QCFS(L=8, theta=2.0)))
    report = snn.calibration_report
    assert report.method == "learned" and report.scores["learned"]["images"] == math.ceil(192 * FAST.holdout)


def test_kl_plus_sites_loss_runs_and_mse_and_the_temperature_differ_from_kl():
    batches = _batches()
    out = {}
    for name, loss, tau in (("kl", "kl", 4.0), ("kl at 1", "kl", 1.0), ("mse", "mse", 4.0), ("kl+sites", "kl+sites", 4.0)):
        opts = LearnedCalibration(steps=10, eval_every=5, patience=10, batch_size=32, loss=loss, temperature=tau)
        snn = ParallelConverter("parallel", T=2, dataloader=batches, progress=False, method="learned",
                                calibration=CalibrationSettings(learned=opts)).convert(_net())
        out[name] = torch.cat([m.v_threshold for m in snn.modules() if isinstance(m, ParallelConversionNode)])
    assert all(not torch.equal(out["kl"], out[k]) for k in ("kl at 1", "mse", "kl+sites"))


@pytest.mark.parametrize("tau", [1.0, 4.0, 0.5])
def test_distillation_kl_is_the_scaled_kl_of_the_softened_distributions(tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    ref, out = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    # Written out in float64: p = softmax(ref / tau), q = softmax(out / tau), tau^2 * mean_n sum_c p (log p - log q).
    r, o = ref.double() / tau, out.double() / tau
    p = torch.exp(r) / torch.exp(r).sum(1, keepdim=True)
    q = torch.exp(o) / torch.exp(o).sum(1, keepdim=True)
    want = tau ** 2 * float((p * (p.log() - q.log())).sum(1).mean())
    assert float(distillation_kl(ref, out, tau)) == pytest.approx(want, rel=1e-5)
    assert float(distillation_kl(ref, ref, tau)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(loss="l1"), "loss"), (dict(holdout=1.0), "holdout"),
    (dict(max_images=1), "max_images"), (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=True), "temperature"),
])
def test_learned_options_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        LearnedCalibration(**kw)


def test_split_images_spreads_the_held_out_part_over_sorted_data():
    # Images numbered 0..63 in 8 batches, "sorted by class" in blocks of 8: the held-out quarter
    # must take images from every block, and the two parts must partition the images.
    batches = [torch.arange(8 * i, 8 * i + 8, dtype=torch.float32)[:, None] for i in range(8)]
    rest, held = split_images(batches, 0.25)
    ids_rest, ids_held = rest[0].flatten().tolist(), held[0].flatten().tolist()
    assert len(ids_held) == 16 and sorted(ids_rest + ids_held) == list(range(64))
    assert {int(i) // 8 for i in ids_held} == set(range(8))
    rest, held = split_images([torch.zeros(3, 1)], 0.01)
    assert rest[0].shape[0] == 2 and held[0].shape[0] == 1
    with pytest.raises(ValueError, match="at least 2 are needed"):
        split_images([torch.zeros(1, 1)], 0.25)


# -- auto ---------------------------------------------------------------------------------------------
def test_choose_prefers_agreement_then_the_simpler_method_then_kl():
    s = lambda a, k: {"agreement": a, "kl": k, "images": 10}  # noqa: E731
    assert choose({"none": s(0.8, 0.1), "ema": s(0.9, 0.5), "learned": s(0.85, 0.01)}) == "ema"
    # equal agreement: the simpler candidate, whatever its KL
    assert choose({"none": s(0.9, 0.3), "ema": s(0.9, 0.2), "learned": s(0.9, 0.25)}) == "none"
    assert choose({"ema": s(0.9, 0.3), "learned": s(0.9, 0.2)}) == "ema"
    # KL decides only between candidates outside the preference list
    assert choose({"x": s(0.9, 0.3), "y": s(0.9, 0.2)}) == "y"


def _agreements(n, agree_with_none, wins, losses):
    """Per-image agreement of ``none`` (the first ``agree_with_none`` of ``n`` images) and of a
    challenger that also gets ``wins`` of the others right and ``losses`` of none's wrong."""
    none = torch.arange(n) < agree_with_none
    other = none.clone()
    other[agree_with_none:agree_with_none + wins] = True
    other[:losses] = False
    return none, other


@pytest.mark.parametrize("wins,losses,clear", [
    (4, 0, False),    # 4 > 2 * sqrt(4) = 4 fails: four net images of 128 are noise (the CNN at T = 16)
    (5, 0, True),     # 5 > 2 * sqrt(5) = 4.47
    (10, 5, False),   # 5 > 2 * sqrt(15) = 7.75 fails
    (20, 5, True),    # 15 > 2 * sqrt(25) = 10
    (0, 0, False),    # identical predictions
    (3, 9, False),    # worse
])
def test_clearly_better_is_a_two_standard_error_sign_test(wins, losses, clear):
    none, other = _agreements(128, 100, wins, losses)
    assert int((other & ~none).sum()) == wins and int((none & ~other).sum()) == losses
    assert clearly_better(other, none) is clear
    # integer 0/1 tensors are agreements too (a bitwise not would count them wrongly)
    assert clearly_better(other.long(), none.long()) is clear


def test_choose_with_per_image_agreement_leaves_no_calibration_only_for_a_clearly_better_one():
    s = lambda a: {"agreement": a, "kl": 0.0, "images": 128}  # noqa: E731
    none, mse = _agreements(128, 100, 4, 0)        # mse: 4 more images, none fewer: not clear
    scores = {"none": s(100 / 128), "mse": s(104 / 128)}
    assert choose(scores) == "mse"                  # the highest agreement alone would take it
    assert choose(scores, {"none": none, "mse": mse}) == "none"
    # among candidates clearly better than none, the plain count decides, even by one image
    _, ema = _agreements(128, 100, 12, 0)
    distill = ema.clone()
    distill[112] = True                             # one image more than ema: not clearly better than ema
    assert clearly_better(distill, none) and not clearly_better(distill, ema)
    both = {"none": s(100 / 128), "ema": s(112 / 128), "distill": s(113 / 128)}
    assert choose(both, {"none": none, "ema": ema, "distill": distill}) == "distill"
    # a higher count that is not clearly above none loses to a lower one that is
    _, wide = _agreements(128, 100, 14, 8)         # 6 net of 22 discordant: 6 < 2 * sqrt(22)
    _, tight = _agreements(128, 100, 5, 0)         # 5 net of 5: 5 > 2 * sqrt(5)
    assert not clearly_better(wide, none) and clearly_better(tight, none)
    assert choose({"none": s(100 / 128), "ema": s(106 / 128), "mse": s(105 / 128)},
                  {"none": none, "ema": wide, "mse": tight}) == "mse"
    # without "none" among the candidates there is no baseline: the count decides
    assert choose({"ema": s(0.5), "mse": s(0.6)}, {"ema": none, "mse": mse}) == "mse"
    # under torch.distributed the counts are summed over processes before the test
    doubled = lambda t, op: t * 2  # noqa: E731  (two processes with the same counts)
    assert choose(scores, {"none": none, "mse": mse}, reducer=doubled) == "mse"   # 8 > 2 * sqrt(8)
    with pytest.raises(ValueError, match=r"no per-image agreement for candidate\(s\) \['mse'\]"):
        choose(scores, {"none": none})
    with pytest.raises(ValueError, match="different lengths"):
        clearly_better(mse[:10], none)
    report = CalibrationReport("auto", "none", scores=scores, passed_over={"mse": "not clearly better than none"})
    assert "passed over mse: not clearly better than none" in report.summary()


@pytest.mark.parametrize("z", [1.0, 2.0, 2.5])
def test_irreplaceable_exactly_when_no_outcome_of_a_challenger_passes_the_sign_test(z):
    for misses in range(0, 12):
        baseline = torch.ones(40, dtype=torch.bool)
        baseline[:misses] = False
        # every outcome a challenger can have: it gains w of the misses and loses l of the rest
        some_pass = any(clearly_better(torch.cat([torch.ones(w, dtype=torch.bool), torch.zeros(misses - w, dtype=torch.bool),
                                                   torch.zeros(l, dtype=torch.bool), torch.ones(40 - misses - l, dtype=torch.bool)]),
                                         baseline, z=z)
                        for w in range(misses + 1) for l in range(40 - misses + 1))
        assert irreplaceable(baseline, z=z) == (not some_pass, misses)
    # summed over processes: 3 misses here and 3 on the other process make 6 > 2 * sqrt(6)
    baseline = torch.tensor([False] * 3 + [True] * 20)
    assert irreplaceable(baseline) == (True, 3)
    assert irreplaceable(baseline, reducer=lambda t, op: t * 2) == (False, 6)


def test_auto_measures_nothing_else_where_no_calibration_misses_too_few_images(monkeypatch):
    from sj_parallel_conversion import recipe as recipe_mod
    built = []
    real, real_fit = recipe_mod.ParallelConversionRecipe._cheap_together, recipe_mod.learn_calibration

    def cheap(self, names, *args):
        built.extend(names)
        return real(self, names, *args)

    def no_fit(*a, **k):
        raise AssertionError("the fit ran although no candidate could replace no calibration")

    monkeypatch.setattr(recipe_mod.ParallelConversionRecipe, "_cheap_together", cheap)
    monkeypatch.setattr(recipe_mod, "learn_calibration", no_fit)
    batches, ann = _batches(8), _net()
    snn = ParallelConverter("parallel", T=64, dataloader=batches, progress=False,
                            calibration=CalibrationSettings(skip_agreement=None)).convert(copy.deepcopy(ann))
    report = snn.calibration_report
    misses = round((1 - report.scores["none"]["agreement"]) * report.scores["none"]["images"])
    assert misses <= 4 and built == ["none"] and report.method == "none"
    assert set(report.skipped) == {"ema", "mse", "distill"} and set(report.scores) == {"none"}
    assert all(f"none disagrees with the ANN on {misses} of" in why for why in report.skipped.values())
    assert "skipped ema, mse, distill: none disagrees" in report.summary()
    # where it misses more (T = 1, the network with its last bias zeroed), every candidate is measured
    built.clear()
    monkeypatch.setattr(recipe_mod, "learn_calibration", real_fit)
    snn = ParallelConverter("parallel", T=1, dataloader=batches, progress=False,
                            calibration=CalibrationSettings(skip_agreement=None, distill=FAST_DISTILL)).convert(_weak_net())
    report = snn.calibration_report
    assert built == ["none", "ema", "mse"] and not report.skipped
    assert round((1 - report.scores["none"]["agreement"]) * report.scores["none"]["images"]) > 4


def test_auto_keeps_a_calibration_only_where_the_sign_test_passes(monkeypatch):
    batches, ann = _batches(8), _weak_net()  # calibration matters at small T
    settings = CalibrationSettings(skip_agreement=None, distill=FAST_DISTILL)

    def convert(T=2):
        return ParallelConverter("parallel", T=T, dataloader=batches, progress=False,
                                 calibration=settings).convert(copy.deepcopy(ann)).calibration_report

    # unpatched, at T = 1 no calibration agrees with the ANN on under half of the selection images
    # and a calibration on (nearly) all: kept
    report = convert(T=1)
    assert report.scores["none"]["agreement"] < 0.6 and report.method != "none"
    assert report.scores[report.method]["agreement"] > 0.9

    # no calibration is ever clearly beaten: it is kept, and every candidate above it is reported
    monkeypatch.setattr(selection, "clearly_better", lambda *args, **kwargs: False)
    report = convert(T=1)
    assert report.method == "none"
    higher = {n for n, sc in report.scores.items() if sc["agreement"] > report.scores["none"]["agreement"]}
    assert higher and set(report.passed_over) == higher
    # every calibration clearly beats it: the plain count decides
    monkeypatch.setattr(selection, "clearly_better", lambda *args, **kwargs: True)
    report = convert(T=1)
    assert report.method == choose(report.scores) and not report.passed_over


def test_auto_is_the_default_reports_its_choice_and_keeps_the_chosen_network(caplog):
    assert ParallelConversionRecipe(4).method == "auto"
    batches = _batches()
    ann = _weak_net()
    with caplog.at_level(logging.INFO, logger="sj_parallel_conversion"):
        snn = ParallelConverter("parallel", T=1, dataloader=batches, progress=False,
                                calibration=CalibrationSettings(skip_agreement=None, distill=FAST_DISTILL)).convert(ann)
    report = snn.calibration_report
    assert isinstance(report, CalibrationReport) and report.requested == "auto"
    assert set(report.scores) == {"none", "ema", "mse", "distill"} and not report.skipped
    assert report.method in report.scores
    # a candidate with more selection images than the one kept was passed over by the sign test, and says so
    higher = {n for n, sc in report.scores.items() if sc["agreement"] > report.scores[report.method]["agreement"]}
    assert set(report.passed_over) == higher
    assert all("not clearly better than none" in why for why in report.passed_over.values())
    assert report.scores[report.method]["agreement"] >= report.scores["none"]["agreement"]
    lines = [r.getMessage() for r in caplog.records if "calibration (auto)" in r.getMessage()]
    assert len(lines) == 1 and f"kept {report.method} (auto)" in lines[0]
    # The network returned is the one that was scored: re-measure it on the selection images and
    # their blends (three per image by default, made with the recipe's seed).
    _, select = split_images(batches, CalibrationSettings().selection_fraction)
    assert report.selection_images == select[0].shape[0] and report.selection_blends == 3 * select[0].shape[0]
    judged = [torch.cat([select[0], blends(select[0], 3, torch.Generator().manual_seed(SELECTION_SEED))])]
    with torch.no_grad():
        refs = [ann(x) for x in judged]
    per_image = []
    measured = held_out_score(lambda x: count_inference(snn, x), judged, refs, "cpu", hits=per_image)
    assert measured["agreement"] == report.scores[report.method]["agreement"]
    assert measured["images"] == report.scores[report.method]["images"] == 4 * select[0].shape[0]
    assert f"{select[0].shape[0]} selection images and {3 * select[0].shape[0]} blends of them" in report.summary()
    assert per_image[0].dtype == torch.bool and per_image[0].shape == (judged[0].shape[0],)
    assert float(per_image[0].double().mean()) == measured["agreement"]
    assert measured["kl"] == pytest.approx(report.scores[report.method]["kl"], rel=1e-4, abs=1e-7)


def _tagged_batches(n=6, size=32):
    """Batches whose every image carries its own number in its first pixel, so that any image seen
    anywhere can be told apart."""
    batches = _batches(n, size)
    for i, b in enumerate(batches):
        b[:, 0, 0, 0] = torch.arange(i * size, (i + 1) * size, dtype=b.dtype) + 1000.0
    return batches


def _ids(tensors):
    return {int(v) for t in tensors for v in t[:, 0, 0, 0].round().tolist()}


def test_fit_early_stopping_and_selection_read_disjoint_images(monkeypatch):
    from sj_parallel_conversion import learned as learned_mod, recipe as recipe_mod

    seen = {"fit": set(), "stop": set(), "scored": []}
    real_fit, real_score = learned_mod.learn_calibration, recipe_mod.held_out_score

    def spy_fit(gm, reference, fit, held, *a, **k):
        seen["fit"] |= _ids(fit)
        seen["stop"] |= _ids(held)
        return real_fit(gm, reference, fit, held, *a, **k)

    def spy_score(model, held, refs, *a, **k):
        seen["scored"].append(torch.cat([t[:, 0, 0, 0] for t in held]))
        return real_score(model, held, refs, *a, **k)

    monkeypatch.setattr(recipe_mod, "learn_calibration", spy_fit)
    monkeypatch.setattr(recipe_mod, "held_out_score", spy_score)
    batches = _tagged_batches()
    snn = ParallelConverter("parallel", T=1, dataloader=batches, progress=False,
                            calibration=CalibrationSettings(skip_agreement=None, distill=FAST_DISTILL)).convert(_weak_net())
    assert len(seen["scored"]) == 4 and all(torch.equal(t, seen["scored"][0]) for t in seen["scored"])  # none ... distill
    n = snn.calibration_report.selection_images
    tags = seen["scored"][0]
    select = {int(v) for v in tags[:n].round().tolist()}
    assert tags[:n].round().tolist() == tags[:n].tolist() and len(select) == n
    # every other scored input is a blend of two selection images (weights 3/4, 1/2, 1/4): no
    # image the fit or its early stopping read enters the choice
    ids = torch.tensor(sorted(select), dtype=tags.dtype)
    for w in (0.75, 0.5, 0.25):
        pairs = (w * ids[:, None] + (1 - w) * ids[None, :]).flatten()
        part = tags[n + int((0.75 - w) * 4) * n:n + int((0.75 - w) * 4 + 1) * n]
        assert all(bool(((pairs - t).abs() < 1e-3).any()) for t in part), w
    assert tags.numel() == 4 * n
    assert seen["fit"] and seen["stop"] and select
    assert not (seen["fit"] & seen["stop"]) and not (seen["fit"] & select) and not (seen["stop"] & select)
    assert seen["fit"] | seen["stop"] | select == _ids(batches)
    assert snn.calibration_report.selection_images == len(select)
    assert snn.calibration_report.held_out_images == len(seen["stop"])


@pytest.mark.parametrize("method", ["distill", "auto"])
def test_no_label_is_read_garbage_labels_give_the_same_network(method):
    batches = _batches()
    g = torch.Generator().manual_seed(5)
    real = [(x, torch.randint(0, 10, (x.shape[0],), generator=g)) for x in batches]
    garbage = [(x, torch.full((3,), -12345)) for x in batches]
    options = dict(progress=False, method=method, calibration=CalibrationSettings(distill=FAST_DISTILL, skip_agreement=None))
    a = ParallelConverter("parallel", T=1, dataloader=real, **options).convert(_weak_net())
    b = ParallelConverter("parallel", T=1, dataloader=garbage, **options).convert(_weak_net())
    assert "distill" in a.calibration_report.seconds  # the fit ran
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _confident_net():
    """_net with logits ten times larger: an ANN whose ranking of the classes is clear."""
    ann = _net()
    with torch.no_grad():
        ann[-1].weight.mul_(10)
        ann[-1].bias.mul_(10)
    return ann


@pytest.mark.parametrize("scope", ["network", "blocks"])
def test_distill_beats_learned_where_thresholds_alone_cannot_fit(scope):
    # At T = 1 every hidden neuron says one bit; its own threshold and spike value cannot make 32
    # bits carry what the ANN's 32 real numbers do, the weights can choose which bits to compute.
    # Block by block, the hidden layer's squared error is already least at the mse start, so the
    # gain comes from the output layer fitted to the quantised hidden layer it now receives.
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        ann[2].weight.mul_(5)  # confident logits: a clear ranking of the classes to match
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 20, generator=g) for _ in range(8)]
    common = dict(steps=150, eval_every=25, patience=3, batch_size=32, lr=1e-2, start="mse")
    learned = ParallelConverter("parallel", T=1, dataloader=batches, progress=False, method="learned",
                                calibration=CalibrationSettings(learned=LearnedCalibration(**common))).convert(ann)
    options = dict(weight_lr=3e-3) if scope == "network" else dict(weight_lr=1e-2, mix=0.0)
    distilled = ParallelConverter("parallel", T=1, dataloader=batches, progress=False, method="distill",
                                  calibration=CalibrationSettings(distill=DistillCalibration(scope=scope, **options, **common))).convert(ann)
    # The same held-out images (same split, same options) for both.
    s_learned, s_distilled = learned.calibration_report.scores["learned"], distilled.calibration_report.scores["distill"]
    assert s_distilled["images"] == s_learned["images"]
    gain = 0.85 if scope == "network" else 0.95
    assert s_distilled["kl"] < gain * s_learned["kl"] and s_distilled["agreement"] >= s_learned["agreement"]
    assert not distilled.calibration_report.learned["fell_back"]
    # The weights moved, the ANN's did not, and the result is still a plain parallel SNN whose
    # spike level equals its count domain.
    layer = 0 if scope == "network" else 1
    weight = lambda m: [c for c in m.modules() if isinstance(c, nn.Linear)][layer].weight  # noqa: E731
    assert not torch.allclose(weight(distilled), weight(ann)) and torch.equal(weight(learned), weight(ann))
    x = batches[0].double()
    snn64 = distilled.double()
    torch.testing.assert_close(spike_inference(snn64, x).mean(0), count_inference(snn64, x), rtol=0, atol=1e-10)


def test_a_fit_that_worsens_held_out_agreement_returns_its_start(monkeypatch, caplog):
    # Every evaluation lowers the held-out KL (so the fit keeps moving) while the agreement falls:
    # the ranking degrades as the logits flatten. The fit must return its starting parameters.
    from sj_parallel_conversion import learned as learned_mod

    calls = []
    probe = torch.cat(_batches(seed=7))

    def worsening(model, *a, **k):
        with torch.no_grad():
            calls.append(model(probe))
        n = len(calls) - 1
        return {"agreement": 0.9 - 0.05 * n, "kl": 1.0 - 0.05 * n, "images": 40}

    monkeypatch.setattr(learned_mod, "held_out_score", worsening)
    opts = LearnedCalibration(steps=30, lr=0.05, eval_every=5, patience=10, batch_size=32, start="none")
    with caplog.at_level(logging.WARNING, logger="sj_parallel_conversion"):
        snn = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method="learned",
                                calibration=CalibrationSettings(learned=opts)).convert(_net())
    history = snn.calibration_report.learned
    assert history["fell_back"] and history["kept_step"] == 0 and history["steps_run"] == 30
    assert "fell back to its start" in snn.calibration_report.label
    assert sum("keeping the start" in r.getMessage() for r in caplog.records) == 1
    start = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False,
                              calibration=CalibrationSettings(calibrate=False)).convert(_net())
    assert not torch.equal(calls[-1], calls[0])  # the fit did move away from its start
    assert torch.equal(count_inference(snn, probe), count_inference(start, probe))


def test_a_drop_of_held_out_agreement_within_its_noise_keeps_the_fit(monkeypatch):
    from sj_parallel_conversion import learned as learned_mod

    # 205 held-out images, start at 93.7 %: two standard errors are 3.4 points. A fit that ends
    # one image lower is kept, one that ends 4 points lower returns the start.
    assert learned_mod.fall_back_margin({"agreement": 0.937, "images": 205}) == pytest.approx(
        2 * math.sqrt(0.937 * 0.063 / 205))
    assert learned_mod.fall_back_margin({"agreement": 1.0, "images": 50}) == pytest.approx(1 / 50)
    for end, fell in ((0.932, False), (0.897, True)):
        scores = iter([0.937] + [end] * 50)
        monkeypatch.setattr(learned_mod, "held_out_score",
                            lambda *a, **k: {"agreement": next(scores), "kl": 0.5, "images": 205})
        snn = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method="distill",
                                calibration=CalibrationSettings(distill=DistillCalibration(
                                    steps=5, eval_every=5, batch_size=32, views=0, fall_back_blends=0))).convert(_net())
        assert snn.calibration_report.learned["fell_back"] is fell


@pytest.mark.parametrize("method", ["distill", "learned"])
def test_the_fall_back_also_reads_blends_of_the_held_out_images(monkeypatch, method):
    # On the held-out images alone the fit ends 4 points below its start (beyond their noise); on
    # them and three blends of each it agrees more often than its start: it is kept. Reading the
    # held-out images alone, it falls back.
    from sj_parallel_conversion import learned as learned_mod
    sizes = []
    plain = iter([0.99, 0.95] + [0.97] * 50)     # the start, then every later evaluation
    judged = iter([0.84, 0.86])

    def score(model, held, refs, *a, **k):
        n = sum(int(x.shape[0]) for x in held)
        sizes.append(n)
        # the KL falls at every evaluation, so the whole-network fit keeps its last step
        return {"agreement": next(judged if n > min(sizes) else plain), "kl": 1.0 - 0.01 * len(sizes), "images": n}

    monkeypatch.setattr(learned_mod, "held_out_score", score)
    cls = DistillCalibration if method == "distill" else LearnedCalibration
    for blends_, fell in ((3, False), (0, True)):
        sizes.clear()
        plain, judged = iter([0.99, 0.95] + [0.97] * 50), iter([0.84, 0.86])
        opts = cls(steps=5, eval_every=5, batch_size=32, views=0, fall_back_blends=blends_)
        snn = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method=method,
                                calibration=CalibrationSettings(**{method: opts})).convert(_net())
        history = snn.calibration_report.learned
        assert history["fell_back"] is fell
        held = min(sizes)
        assert set(sizes) == ({held, 4 * held} if blends_ else {held})
        if blends_:
            assert history["fall_back_check"]["start"]["images"] == 4 * held


@pytest.mark.parametrize("plain_share, blend_share, fits", [(1.0, 0.0, False), (0.75, 1.0, True)])
def test_the_fit_skip_reads_the_selection_images_not_their_blends(monkeypatch, plain_share, blend_share, fits):
    # Every candidate agrees with the ANN on plain_share of the selection images and blend_share of
    # their blends; skip_agreement=0.9. All selection images but no blend: skipped although the
    # agreement over all judged items is a quarter. Three quarters of the images and every blend
    # (over 0.9 of all items): fitted.
    from sj_parallel_conversion import recipe as recipe_mod
    ran = []

    def score(model, held, refs, device, reducer=None, hits=None):
        n = sum(int(x.shape[0]) for x in held)
        plain = n // 4
        h = torch.zeros(n, dtype=torch.bool)
        h[:round(plain_share * plain)] = True
        h[plain:plain + round(blend_share * (n - plain))] = True
        if hits is not None:
            hits.append(h)
        return {"agreement": float(h.double().mean()), "kl": 0.1, "images": n}

    monkeypatch.setattr(recipe_mod, "held_out_score", score)
    monkeypatch.setattr(recipe_mod, "irreplaceable", lambda *a, **k: (False, 99))
    monkeypatch.setattr(recipe_mod, "learn_calibration", lambda gm, *a, **k: ran.append(1) or (gm, {"seconds": 0.0}))
    snn = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False,
                            calibration=CalibrationSettings(skip_agreement=0.9)).convert(_net())
    report = snn.calibration_report
    assert bool(ran) is fits and ("distill" in report.skipped) is not fits
    assert (report.scores["none"]["agreement"] > 0.9) is fits


def test_auto_skips_the_fit_when_a_cheap_candidate_already_agrees(monkeypatch):
    from sj_parallel_conversion import recipe as recipe_mod

    def no_fit(*a, **k):
        raise AssertionError("the fit ran although a cheap candidate agreed on every selection image")

    monkeypatch.setattr(recipe_mod, "learn_calibration", no_fit)
    # this is about the agreement bound: the sign-test shortcut (no calibration irreplaceable) is off
    monkeypatch.setattr(recipe_mod, "irreplaceable", lambda *a, **k: (False, 99))
    snn = ParallelConverter("parallel", T=64, dataloader=_batches(), progress=False,
                            calibration=CalibrationSettings(skip_agreement=0.95)).convert(_net())
    report = snn.calibration_report
    assert "distill" in report.skipped and "agrees with the ANN" in report.skipped["distill"]
    assert set(report.scores) == {"none", "ema", "mse"} and report.method in report.scores
    assert "skipped distill" in report.summary()


def test_paper_method_is_algorithm_1_with_the_papers_settings_on_convolution_sites():
    from sj_parallel_conversion import calibration
    from sj_parallel_conversion.activation import DAQCFS

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 16), nn.ReLU(),
                        nn.Linear(16, 10)).eval()
    batches = _batches()
    snn = ParallelConverter("parallel", T=4, dataloader=batches, progress=False, method="paper").convert(ann)
    assert snn.calibration_report.method == "paper"
    nodes = [m for m in snn.modules() if isinstance(m, ParallelConversionNode)]
    # The fully connected site keeps psi_da = phi_da = 0: no shift beyond the half threshold,
    # spike value = threshold.
    assert torch.equal(nodes[1].psi_da, torch.zeros_like(nodes[1].psi_da))
    assert torch.equal(nodes[1].spike_value, nodes[1].v_threshold)
    # The convolution site: alpha = 0.99 without bias correction, i.e. after n batches the shift
    # holds only 1 - 0.99**n of the averaged error (independent check with calibrate_da).
    recipe = ParallelConversionRecipe(4, batches, method="ema", progress=False,
                                      calibration=CalibrationSettings(alpha=0.99, bias_correction=False))
    reference = ParallelConverter(recipe).convert(ann)
    ref_nodes = [m for m in reference.modules() if isinstance(m, ParallelConversionNode)]
    torch.testing.assert_close(nodes[0].psi_da, ref_nodes[0].psi_da)
    assert not torch.equal(ref_nodes[1].psi_da, torch.zeros_like(ref_nodes[1].psi_da))


def test_convolution_sites_follow_the_first_argument_through_sums_to_a_convolution():
    from sj_parallel_conversion import calibration
    from sj_parallel_conversion.tools.models.cifar import CifarResNet
    from torch import fx

    gm = fx.symbolic_trace(CifarResNet(nn.ReLU, depth=8))
    sites = calibration.convolution_sites(gm)
    assert len(sites) == 7  # stem + 3 blocks x 2: every ReLU of a ResNet follows a convolution
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert calibration.convolution_sites(gm) == []


@pytest.mark.parametrize("method,sites", [("ema", None), ("moment", None), ("ema", ["3"])])
def test_algorithm_1_from_several_starts_in_one_pass_equals_one_pass_each(method, sites):
    """calibrate_da_variants runs the ANN's stream once for all starts; each network it returns
    has exactly the parameters calibrate_da gives from that start alone (also where only some
    sites are calibrated, as Algorithm 1 as published does)."""
    from sj_parallel_conversion import calibration
    from sj_parallel_conversion.tracing import activation_calls_to_modules
    from torch import fx

    torch.manual_seed(2)
    convs = [nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)]
    batches = _batches()
    with torch.no_grad():
        first = convs[0](torch.cat(batches)).clamp(min=0).amax(dim=(0, 2, 3))
        second = convs[1](convs[0](torch.cat(batches)).clamp(min=0)).clamp(min=0).amax(dim=(0, 2, 3))
    net = nn.Sequential(convs[0], ClipReLU(first), convs[1], ClipReLU(second), nn.Flatten(), nn.Linear(320, 4)).eval()
    gm = activation_calls_to_modules(fx.symbolic_trace(net))
    starts = [None, calibration.mse_thresholds(gm, batches, 4, "cpu"), None]
    together = calibration.calibrate_da_variants(copy.deepcopy(gm), batches, 4, "cpu", starts, progress=False,
                                                 method=method, sites=sites)
    assert len(together) == 3
    for start, got in zip(starts, together):
        alone = calibration.calibrate_da(copy.deepcopy(gm), batches, 4, "cpu", progress=False, method=method,
                                         thresholds=start, sites=sites)
        for site in ("1", "3"):
            a, b = got.get_submodule(site), alone.get_submodule(site)
            assert isinstance(a, DAQCFS) and isinstance(b, DAQCFS)
            for name in ("theta", "psi_da", "phi_da"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (start is None, site, name)
    # The starts differ, and so do the calibrated parameters.
    assert not torch.equal(together[0].get_submodule("1").theta, together[1].get_submodule("1").theta)
    if sites is None:
        assert not torch.equal(together[0].get_submodule("1").phi_da, together[1].get_submodule("1").phi_da)
    assert not torch.equal(together[0].get_submodule("3").psi_da, together[1].get_submodule("3").psi_da)


def test_mse_thresholds_equal_a_brute_force_search():
    from sj_parallel_conversion import calibration
    from torch import fx

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 4, 4, generator=g) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    from sj_parallel_conversion.tracing import activation_calls_to_modules

    site = ClipReLU(x.clamp(min=0).amax(dim=(0, 2, 3)))
    gm = activation_calls_to_modules(fx.symbolic_trace(nn.Sequential(site)))
    T, grid = 3, 16
    chosen = calibration.mse_thresholds(gm, [x], T, "cpu", samples=10 ** 6, grid=grid)["0"]
    # Brute force in float64, written out: theta/T * clip(floor(x*T/theta + 1/2), 0, T) per channel.
    for c in range(3):
        v = x[:, c].double().flatten()
        best = None
        for i in range(1, grid + 1):
            theta = float(site.theta[c]) * i / grid
            q = theta / T * torch.clamp(torch.floor(v * T / theta + 0.5), 0, T)
            err = float(((q - v.clamp(min=0).clamp(max=float(site.theta[c]))) ** 2).sum())
            if best is None or err < best[0] - 1e-9:
                best = (err, theta)
        assert float(chosen[c]) == pytest.approx(best[1], rel=1e-5)
    assert bool((chosen < site.theta).all())  # at T = 3 the maximum is never the best clip here


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_mse_thresholds_from_a_sample_of_positions_keep_each_channel_apart(channel_dim):
    """With fewer samples than positions, each channel's threshold still comes from that channel's
    values (channel axis second or last): within one grid step of the search over all values."""
    from sj_parallel_conversion import calibration
    from sj_parallel_conversion.tracing import activation_calls_to_modules
    from torch import fx

    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([0.5, 4.0, 1.5])
    x = torch.randn(64, 3, 8, 8, generator=g) * scales.view(1, 3, 1, 1)
    if channel_dim == -1:
        x = x.movedim(1, -1).contiguous()
    dims = tuple(d for d in range(4) if d != channel_dim % 4)
    site = ClipReLU(x.clamp(min=0).amax(dim=dims), channel_dim=channel_dim)
    gm = activation_calls_to_modules(fx.symbolic_trace(nn.Sequential(site)))
    T, grid = 3, 32
    sampled = calibration.mse_thresholds(gm, [x], T, "cpu", samples=1024, grid=grid)["0"]
    full = calibration.mse_thresholds(gm, [x], T, "cpu", samples=10 ** 6, grid=grid)["0"]
    step = site.theta / grid
    assert bool(((sampled - full).abs() <= step * 1.01).all()), (sampled, full)
    assert bool((full[1] > 4 * full[0]) & (full[1] > 1.5 * full[2]))  # the channels differ clearly


def test_lossless_qcfs_needs_no_calibration_and_no_report():
    snn = ParallelConverter("parallel", T=8, progress=False).convert(_net(lambda: QCFS(L=8, theta=2.0)))
    assert snn.calibration_report is None


# -- calibration data ----------------------------------------------------------------------------------
def test_a_one_shot_generator_is_read_once_and_gives_the_same_network_as_a_list():
    batches = _batches()
    from_list = ParallelConverter("parallel", T=4, dataloader=batches, progress=False, method="ema").convert(_net())
    gen = (b for b in batches)
    from_gen = ParallelConverter("parallel", T=4, dataloader=gen, progress=False, method="ema").convert(_net())
    a, b = from_list.state_dict(), from_gen.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_one_shot_iterator_beyond_the_cache_limit_is_refused_with_advice():
    from sj_parallel_conversion.calibration import CalibrationData

    data = CalibrationData(iter(_batches()), max_cache_bytes=10_000)
    with pytest.raises(ValueError, match="num_batches"):
        list(data)


@pytest.mark.parametrize("batch, err, match", [
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), TypeError, "floating point"),
    (torch.zeros(3 * 8 * 8), ValueError, "batch axis"),
    ({"label": torch.zeros(4)}, ValueError, "input key"),
    ("images.npz", TypeError, "tensor"),
])
def test_the_first_batch_is_checked_before_any_work(batch, err, match, monkeypatch):
    from sj_parallel_conversion import calibration

    def no_work(*a, **k):
        raise AssertionError("calibration started before the data was checked")

    monkeypatch.setattr(calibration, "calibrate_da", no_work)
    with pytest.raises(err, match=match):
        ParallelConverter("parallel", T=4, dataloader=[batch], progress=False, method="ema").convert(_net())


def test_a_model_with_two_inputs_or_the_wrong_input_shape_is_refused_up_front():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.relu = nn.ReLU()

        def forward(self, x, y):
            return self.relu(self.fc(x + y))

    with pytest.raises(ValueError, match="2 required inputs"):
        ParallelConverter("parallel", T=4, dataloader=[torch.randn(4, 4)], progress=False).convert(TwoInputs())
    with pytest.raises(ValueError, match=r"cannot run on the first calibration batch \(input shape \(4, 5, 8, 8\)"):
        ParallelConverter("parallel", T=4, dataloader=[torch.randn(4, 5, 8, 8)], progress=False).convert(_net())


def test_empty_calibration_data_is_refused():
    with pytest.raises(ValueError, match="yielded no batch"):
        ParallelConverter("parallel", T=4, dataloader=iter([]), progress=False).convert(_net())


def test_learned_formula_matches_the_node_count_domain():
    """The fitted DA-QCFS and the node built from it compute the same rate (the count domain)."""
    g = torch.Generator().manual_seed(0)
    da = DAQCFS(4, torch.rand(5, generator=g) + 0.5, psi_da=torch.randn(5, generator=g) * 0.1,
                phi_da=torch.randn(5, generator=g) * 0.1)
    node = da.to_node()
    x = torch.randn(7, 5, 3, generator=g)
    assert torch.equal(da(x), node.rate(x.clone()))
    k = formulas.spike_count(x, 4, formulas.channel_view(da.theta, 3), formulas.channel_view(0.5 * da.theta, 3),
                             formulas.channel_view(da.psi_da, 3), ste=True)
    assert torch.equal(k, node.count(x.clone()))


@pytest.mark.parametrize("shape, cd", [((6, 3, 4, 4), 1), ((5, 3), 1), ((2, 4, 3), -1)])
def test_fused_fit_function_matches_autograd_of_the_straight_through_formula(shape, cd):
    from sj_parallel_conversion.learned import daqcfs_fit

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    pre = (torch.rand(3, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    post = (torch.rand(3, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    psi = (torch.randn(3, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    out = daqcfs_fit(x, pre, post, psi, 4, 0.5, cd)
    grads = torch.autograd.grad((out * w).sum(), (x, pre, post, psi))
    # Independent formulation: plain autograd through the closed form, with a floor whose gradient
    # is 1 wherever the count is not clipped (0 <= floor(u) <= T, both ends included, as LSQ does).
    v = lambda p: formulas.channel_view(p, x.dim(), cd)  # noqa: E731
    u = ((x + v(psi)) * 4 + 0.5 * v(pre)) / v(pre)
    inside = ((torch.floor(u) >= 0) & (torch.floor(u) <= 4)).detach()
    k = torch.where(inside, formulas.floor_ste(u), torch.floor(u).clamp(0, 4).detach())
    ref = (v(pre) + (v(post) - v(pre))) / 4 * k
    ref_grads = torch.autograd.grad((ref * w).sum(), (x, pre, post, psi))
    assert torch.equal(out, ref)
    for a, b, name in zip(grads, ref_grads, ("x", "theta_pre", "theta_post", "psi_da")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_a_plateau_returns_to_the_best_parameters_with_a_smaller_step_and_the_last_one_stops(monkeypatch):
    # A held-out loss that never improves: every `patience` evaluations make a plateau. The first
    # `cuts` plateaus return to the best (= starting, all-zero) parameters and multiply the rate
    # by `decay`; the next one ends the fit.
    from sj_parallel_conversion import learned as learned_mod

    monkeypatch.setattr(learned_mod, "held_out_score",
                        lambda *a, **k: {"agreement": 0.5, "kl": 1.0, "images": 1})
    seen = []  # (rate, parameters before the step) at every Adam step
    step = torch.optim.Adam.step

    def recording_step(self, *a, **kw):
        seen.append((self.param_groups[0]["lr"], [p.detach().clone() for p in self.param_groups[0]["params"]]))
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    opts = LearnedCalibration(steps=100, lr=0.02, eval_every=3, patience=2, decay=0.5, cuts=2, batch_size=32, start="none",
                              warmup=0)
    snn = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method="learned",
                            calibration=CalibrationSettings(learned=opts)).convert(_net())
    history = snn.calibration_report.learned
    assert history["cuts"] == [6, 12] and history["steps_run"] == 18 and history["kept_step"] == 0
    assert [lr for lr, _ in seen] == pytest.approx([0.02] * 6 + [0.01] * 6 + [0.005] * 6)
    for i, (_, params) in enumerate(seen):
        at_start = all(float(p.abs().max()) == 0.0 for p in params)
        assert at_start == (i % 6 == 0), i  # back at the start exactly after each cut


def test_plateau_options_are_checked():
    for kw, pattern in ((dict(decay=1.0), "decay must be a number in \\(0, 1\\)"), (dict(decay=0), "decay"),
                        (dict(cuts=-1), "cuts must be an integer >= 0"), (dict(patience=0), "patience")):
        with pytest.raises(ValueError, match=pattern):
            LearnedCalibration(**kw)


def test_comparison_rows_and_json_name_the_calibration(tmp_path):
    import json

    from sj_parallel_conversion.tools.compare import compare_converters

    batches = _batches()
    test = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in _batches(n=1, seed=9)]
    labels = {}
    for options in (dict(method="ema"), dict(calibration=CalibrationSettings(calibrate=False)),
                    dict(method="auto", calibration=CalibrationSettings(distill=FAST_DISTILL, skip_agreement=None))):
        table = compare_converters(_net(), batches, test, [2], methods=["ann", "parallel-count"], progress=False,
                                   recipe_options=options)
        table.to_json(str(tmp_path / "t.json"))
        doc = json.loads((tmp_path / "t.json").read_text())
        rows = doc["rows"]
        assert rows[0]["calibration"] == ""  # the ANN
        assert doc["machine"] and doc["provenance"]["torch"] == torch.__version__
        assert doc["provenance"]["spikingjelly"] not in ("", "not installed")
        assert doc["provenance"]["sj_parallel_conversion"] not in ("", "not installed")
        labels[str(options.get("method", "none"))] = rows[1]["calibration"]
        assert rows[1]["calibration"] in table.to_text()
    assert labels["ema"] == "ema" and labels["none"] == "none"
    assert labels["auto"].endswith("(auto)") and labels["auto"].split()[0] in ("none", "ema", "mse", "distill")


def _record_rates(monkeypatch) -> list:
    """Every Adam step appends its groups' rates to the returned list."""
    seen = []
    step = torch.optim.Adam.step

    def recording_step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    return seen


def test_the_rates_rise_linearly_over_the_warm_up(monkeypatch):
    seen = _record_rates(monkeypatch)
    opts = DistillCalibration(steps=12, lr=0.01, weight_lr=0.002, warmup=8, eval_every=100, batch_size=32, start="none",
                              scope="network")
    ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method="distill",
                      calibration=CalibrationSettings(distill=opts)).convert(_net())
    assert [s[0] for s in seen] == pytest.approx([0.01 * min(1, (i + 1) / 8) for i in range(12)])
    assert [s[1] for s in seen] == pytest.approx([0.002 * min(1, (i + 1) / 8) for i in range(12)])


def test_each_block_decays_its_rates_along_a_cosine(monkeypatch):
    seen = _record_rates(monkeypatch)
    opts = DistillCalibration(steps=10, lr=0.01, weight_lr=0.002, eval_every=100, batch_size=32, start="none", views=0)
    ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method="distill",
                      calibration=CalibrationSettings(distill=opts)).convert(_net())
    cosine = [0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
    assert len(seen) % 10 == 0 and len(seen) >= 20
    for block in range(len(seen) // 10):
        rates = seen[10 * block:10 * block + 10]
        assert [r[-1] for r in rates] == pytest.approx([0.002 * c for c in cosine])


@pytest.mark.parametrize("method, phases", [
    ("distill", [r"calibration: \d+ images read \(\d+\.\d s\)$", r"distill: \d+ blocks, .* \(\d+\.\d s\)$",
                 r"distill: \d+ blocks fitted, held-out agreement .*, \d+ s$"]),
    ("learned", [r"calibration: \d+ images read \(\d+\.\d s\)$", r"learned: .* ANN outputs ready \(\d+\.\d s\)$",
                 r"learned: kept step \d+ of \d+, .*, \d+ s$"]),
])
def test_each_phase_of_a_fit_is_one_log_line_with_its_elapsed_time_without_a_terminal(caplog, capsys, method,
                                                                                      phases):
    """calibration.rst: one INFO line per phase, with the time so far, even where stderr is not a
    terminal (as here: pytest captures it) and the progress bar is therefore not drawn."""
    import re
    import sys

    assert not sys.stderr.isatty()
    with caplog.at_level(logging.INFO, logger="sj_parallel_conversion"):
        ParallelConverter("parallel", T=2, dataloader=_batches(), method=method, progress=True,
                          calibration=CalibrationSettings(distill=FAST_DISTILL, learned=FAST)).convert(_net())
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for phase in phases:
        assert sum(bool(re.match(phase, line)) for line in lines) == 1, (phase, lines)


def test_block_fits_train_the_head_with_the_options_loss_and_temperature():
    # The options used to be accepted and ignored block by block: the three fits were bit for bit
    # the same. Now the head (the last block, whose output is the logits) follows them.
    heads = {}
    for name, extra in (("kl", {}), ("kl, tau 4", dict(temperature=4.0)), ("mse", dict(loss="mse")),
                        ("kl, explicit", dict(loss="kl", temperature=1.0))):
        opts = DistillCalibration(steps=6, eval_every=100, batch_size=32, views=0, **extra)
        snn = ParallelConverter("parallel", T=2, dataloader=_batches(), progress=False, method="distill",
                                calibration=CalibrationSettings(distill=opts)).convert(_net())
        heads[name] = [m for m in snn.modules() if isinstance(m, nn.Linear)][-1].weight
    assert torch.equal(heads["kl"], heads["kl, explicit"])
    assert not torch.equal(heads["kl"], heads["kl, tau 4"]) and not torch.equal(heads["kl"], heads["mse"])
    with pytest.raises(ValueError, match="kl\\+sites' needs scope='network'"):
        DistillCalibration(loss="kl+sites").check()


def test_the_algorithm_1_pass_of_a_fit_is_cut_where_its_images_exceed_the_byte_bound(monkeypatch):
    from sj_parallel_conversion import recipe as recipe_mod

    sizes = []
    conv2d = torch.nn.functional.conv2d

    def recording(x, *args, **kw):
        sizes.append(x.shape[0])
        return conv2d(x, *args, **kw)

    def largest_batch(bound):
        monkeypatch.setattr(recipe_mod, "ALGORITHM_1_BATCH_BYTES", bound)
        opts = LearnedCalibration(steps=2, eval_every=100, batch_size=4, views=0, start="ema")
        monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
        sizes.clear()
        ParallelConverter("parallel", T=2, dataloader=list(torch.cat(_batches()).split(6)), progress=False,
                          method="learned",
                          calibration=CalibrationSettings(learned=opts)).convert(_net())
        monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
        return max(sizes)

    image = 3 * 8 * 8 * 4  # bytes of one float32 input image
    # 192 images in batches of 6, 153 of them fitted: one batch of both streams (306) by default,
    # whatever the loader's batches; at most 2 x 6 once the bound is 6 images.
    assert largest_batch(recipe_mod.ALGORITHM_1_BATCH_BYTES) >= 2 * 153
    assert largest_batch(6 * image) <= 2 * 6
