"""Comparison timings and plots: times come from the median of several timed calls (batches,
repeats), plots label them with the machine and show throughput only when there were several;
every method's line stays visible."""
from __future__ import annotations

import json
import time

import pytest
import torch

from sj_parallel_conversion.inference import evaluate
from sj_parallel_conversion.tools.compare import ComparisonRow, ComparisonTable, evaluate_steps, machine_label


def _slow_once(delay: float):
    """A predictor whose second call (the first timed one) is slow, as under a brief load spike."""
    calls = []

    def predict(x):
        calls.append(1)
        if len(calls) == 2:
            time.sleep(delay)
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).float()
    return predict


def test_evaluate_times_the_median_of_repeats_and_of_batches():
    one = [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))]
    acc, n, once = evaluate(_slow_once(0.3), one, progress=False, repeats=1)
    assert (acc, n) == (1.0, 4) and once >= 0.3
    _, _, median = evaluate(_slow_once(0.3), one, progress=False, repeats=3)
    assert median < 0.1  # one slow call out of three does not move the median
    _, n, batches = evaluate(_slow_once(0.3), one * 3, progress=False)
    assert n == 12 and batches < 0.1  # nor does one slow batch out of three


def test_count_batches():
    from sj_parallel_conversion.tools.compare import count_batches

    assert count_batches([1, 2, 3]) == 3 and count_batches([1, 2, 3], 2) == 2
    assert count_batches(iter([1, 2, 3])) == 1  # unknown length: counted as one


@pytest.mark.parametrize("bad", [0, 1.5, True])
def test_repeats_must_be_a_positive_integer(bad):
    data = [(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="evaluate: repeats"):
        evaluate(lambda x: x, data, progress=False, repeats=bad)
    with pytest.raises(ValueError, match="evaluate_steps: repeats"):
        evaluate_steps(torch.nn.Identity(), data, [1], progress=False, repeats=bad)


def test_machine_label_names_the_cpu_and_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = machine_label()
        torch.set_num_threads(2)
        two = machine_label("cpu")
    finally:
        torch.set_num_threads(before)
    assert one.endswith(", 1 thread") and two.endswith(", 2 threads")
    assert one.split(",")[0].strip() and one.split(",")[0] == two.split(",")[0]


def _table(timed_calls: int) -> ComparisonTable:
    rows = [ComparisonRow("ann", None, 0.9, 100, 0.0, 0.5)]
    for T in (4, 8, 16):
        rows.append(ComparisonRow("parallel", T, 0.8, 100, 1.0, 2.0))
        rows.append(ComparisonRow("parallel-count", T, 0.8, 100, 1.0, 0.6))  # same accuracy: would overlap
        rows.append(ComparisonRow("rate-cw-99.9%", T, 0.1 * T / 4, 100, 1.0, 0.1 * T))
    return ComparisonTable(rows=rows, title="t", timed_calls=timed_calls, machine="Some CPU, 2 threads")


def test_plot_shows_throughput_only_for_repeated_timings_and_names_the_machine(tmp_path):
    import matplotlib.pyplot as plt

    path = tmp_path / "repeated.png"
    assert _table(3).plot(str(path)) == str(path) and path.stat().st_size > 1000
    single = _table(1)._figure()
    assert [ax.get_title() for ax in single.axes] == ["accuracy vs T"]  # no throughput panel
    plt.close(single)
    fig = _table(3)._figure()
    try:
        acc, speed = fig.axes
        assert "median of 3 timed calls" in speed.get_title() and "Some CPU, 2 threads" in speed.get_title()
        # Methods with equal accuracy are still told apart: different markers and x positions.
        lines = [ln for ln in acc.get_lines() if ln.get_label() != "ANN"]
        assert len(lines) == 3
        assert len({ln.get_marker() for ln in lines}) == 3
        assert len({tuple(ln.get_xdata()) for ln in lines}) == 3
    finally:
        plt.close(fig)


def test_table_json_round_trip_keeps_timed_calls_and_machine(tmp_path):
    path = tmp_path / "t.json"
    table = _table(5)
    table.to_json(str(path))
    back = ComparisonTable.from_json(str(path))
    assert (back.timed_calls, back.machine, back.title) == (5, "Some CPU, 2 threads", "t")
    assert back.rows == table.rows
    path.write_text(json.dumps({"title": "x"}))
    with pytest.raises(ValueError, match="from_json: .* no 'rows' list"):
        ComparisonTable.from_json(str(path))
