"""SpikingJelly baselines in compare: the channel-wise half-threshold settings and the one-run
evaluation of every T."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

from sj_parallel_conversion import ParallelConverter
from sj_parallel_conversion.inference import evaluate
from sj_parallel_conversion.tools.compare import BUILTIN, METHODS, compare_converters, convert_builtin, evaluate_steps
from sj_parallel_conversion.inference import predictor


def _model_and_data():
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(96, 1, 6, 6)
    with torch.no_grad():
        y = ann(x).argmax(1)  # labels the ANN gets right, so accuracies are comparable
    calib = [x[:32], x[32:64]]
    test = [(x[i:i + 24], y[i:i + 24]) for i in range(0, 96, 24)]
    return ann, calib, test


def test_builtin_methods_are_listed_and_the_strongest_settings_use_half_threshold_neurons():
    assert {"rate-cw-max", "rate-cw-99.9%"} <= set(METHODS) and set(BUILTIN) <= set(METHODS)
    ann, calib, _ = _model_and_data()
    strong = convert_builtin("rate-cw-99.9%", ann, calib, progress=False)
    plain = convert_builtin("rate-99.9%", ann, calib, progress=False)
    assert any(isinstance(m, neuron.HalfThresholdIFNode) for m in strong.modules())
    assert not any(isinstance(m, neuron.HalfThresholdIFNode) for m in plain.modules())
    with pytest.raises(ValueError, match="convert_builtin: method"):
        convert_builtin("rate-cw", ann, calib)


@pytest.mark.parametrize("method", ["rate-cw-max", "rate-max"])
def test_evaluate_steps_matches_separate_runs(method):
    """One run of the largest T gives, for every smaller T, the accuracy of a run of T steps."""
    ann, calib, test = _model_and_data()
    snn = convert_builtin(method, ann, calib, progress=False)
    Ts = [1, 3, 8]
    one_run = evaluate_steps(snn, test, Ts, progress=False)
    for T in Ts:
        acc, n, _ = evaluate(predictor(snn, T), test, progress=False)
        assert one_run[T][:2] == (acc, n)
    assert one_run[1][2] == pytest.approx(one_run[8][2] / 8)


def test_evaluate_steps_refuses_parallel_networks_and_bad_T():
    ann, calib, test = _model_and_data()
    snn = ParallelConverter("parallel", T=4, dataloader=calib, progress=False, method="ema").convert(ann)
    with pytest.raises(ValueError, match="parallel neurons"):
        evaluate_steps(snn, test, [4], progress=False)
    if_snn = convert_builtin("rate-max", ann, calib, progress=False)
    with pytest.raises(ValueError, match="T_list"):
        evaluate_steps(if_snn, test, [0, 4], progress=False)


def test_compare_reports_the_strongest_baseline_at_every_T():
    ann, calib, test = _model_and_data()
    table = compare_converters(ann, calib, test, [2, 16], methods=("ann", "rate-cw-99.9%"), progress=False)
    rows = [r for r in table.rows if r.method == "rate-cw-99.9%"]
    assert [r.T for r in rows] == [2, 16] and all(r.accuracy is not None for r in rows)
    assert "from the T=16 run, time scaled by T/16" in rows[0].status and rows[1].status == "ok"
    assert "channel-wise, half threshold" in table.to_text()
