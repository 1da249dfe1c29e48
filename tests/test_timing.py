"""Timings wait for the device: every timed call in ``inference.evaluate`` and ``evaluate_steps``
sits between two CUDA synchronisations (emulated on CPU by recording ``torch.cuda.synchronize``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sj_parallel_conversion import inference, timing
from sj_parallel_conversion.tools import compare


@pytest.fixture
def cuda_events(monkeypatch):
    """Pretend this process has used CUDA and record every synchronisation."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", device)))
    return events


def _timed_calls_are_synchronised(events, label):
    """Every ``label`` event after the warm-up has a synchronisation just before and just after."""
    calls = [i for i, e in enumerate(events) if e[0] == label]
    timed = calls[1:]  # the first call is the untimed warm-up
    assert timed
    for i in timed:
        assert events[i - 1][0] == "sync" and events[i + 1][0] == "sync", events


def test_evaluate_synchronises_cuda_around_every_timed_call(cuda_events):
    def predict(x):
        cuda_events.append(("predict", None))
        return torch.zeros(len(x), 3)

    loader = [(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))] * 2
    inference.evaluate(predict, loader, progress=False, repeats=2)
    _timed_calls_are_synchronised(cuda_events, "predict")


def test_evaluate_steps_synchronises_cuda_around_every_timed_call(cuda_events):
    class Recorder(nn.Module):
        def forward(self, x):
            cuda_events.append(("run", None))
            return x.flatten(2)[..., :3]

    loader = [(torch.randn(4, 2, 2), torch.zeros(4, dtype=torch.long))]
    compare.evaluate_steps(Recorder(), loader, [1, 2], progress=False, repeats=2)
    _timed_calls_are_synchronised(cuda_events, "run")


def test_synchronize_is_free_without_cuda_and_targets_the_named_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    timing.synchronize("cuda:1")
    assert calls == []  # CUDA never used here: nothing to wait for, and no CUDA initialisation
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    timing.synchronize("cuda:1")
    timing.synchronize("cpu")
    assert calls == [torch.device("cuda:1"), None]
    assert timing.timed(lambda: None, "cpu") >= 0 and len(calls) == 4
