"""Two gloo processes calibrate on their shards and end with the single-process parameters."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from sj_parallel_conversion import ParallelConverter, count_inference
from sj_parallel_conversion.compare import evaluate
from sj_parallel_conversion.distributed import allreduce_reducer, distributed_evaluate, shard_indices
from sj_parallel_conversion.learned import LearnedCalibration

BATCH = 16  # per rank


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (128,), generator=g)
    return x, y


def _options(method):
    if method == "learned":
        return dict(method="learned", learned=LearnedCalibration(steps=12, eval_every=4, patience=1, cuts=1, batch_size=BATCH))
    return dict(method=method)


def _worker(rank, world, init_file, out_dir, method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        idx = list(shard_indices(len(x), rank, world))
        xs, ys = x[idx], y[idx]
        loader = [(xs[i:i + BATCH], ys[i:i + BATCH]) for i in range(0, len(xs), BATCH)]
        snn = ParallelConverter("parallel", T=4, dataloader=loader, progress=False,
                                reducer=allreduce_reducer(), **_options(method)).convert(_model())
        acc, n, _ = distributed_evaluate(lambda b: count_inference(snn, b), loader)
        torch.save({"state": snn.state_dict(), "acc": acc, "n": n}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@pytest.mark.parametrize("method", ["ema", "learned"])
def test_two_process_gloo_calibration_equals_single_process(tmp_path, method):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), method), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    # Single process on the union: step n sees rank 0's n-th batch and rank 1's n-th batch together.
    x, y = _data()
    shards = [x[list(shard_indices(len(x), r, world))] for r in range(world)]
    union = [torch.cat([s[i:i + BATCH] for s in shards]) for i in range(0, len(shards[0]), BATCH)]
    options = _options(method)
    if method == "learned":  # the single process's minibatches are the union of the ranks' minibatches
        options["learned"] = LearnedCalibration(steps=12, eval_every=4, patience=1, cuts=1, batch_size=world * BATCH)
    ref = ParallelConverter("parallel", T=4, dataloader=union, progress=False, **options).convert(_model()).state_dict()
    assert r0["state"].keys() == ref.keys()
    for k in ref:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0["state"][k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs from single process")
    # Calibration moved psi_da (the node's bias) or phi_da (spike_value - v_threshold) away from
    # their initial 0 at some node, so equal results above are not equal defaults.
    nodes = sorted({k.rpartition(".")[0] for k in ref if k.endswith(".spike_value")})
    assert nodes, "no parallel neuron in the converted model"
    assert any(ref[f"{n}.bias"].abs().max() > 1e-4
               or (ref[f"{n}.spike_value"] - ref[f"{n}.v_threshold"]).abs().max() > 1e-4 for n in nodes)
    # Evaluation counts are summed over ranks.
    assert r0["n"] == r1["n"] == len(x)
    assert r0["acc"] == r1["acc"]


def test_shards_are_contiguous_equal_and_disjoint():
    shards = [list(shard_indices(10, r, 3)) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # item 9 dropped: every rank runs 3 steps
    assert list(shard_indices(7)) == list(range(7))  # one process: everything
    with pytest.raises(ValueError, match="cannot shard 2 items over 3 processes"):
        shard_indices(2, 0, 3)


def test_without_a_process_group_reduction_and_evaluation_are_local():
    assert not dist.is_initialized()
    t = torch.tensor([1.0, -2.0])
    assert torch.equal(allreduce_reducer()(t, "sum"), t) and torch.equal(allreduce_reducer()(t, "max"), t)
    x, y = _data()
    loader = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, 64, BATCH)]
    model = _model()
    acc, n, _ = distributed_evaluate(model, loader)
    assert (acc, n) == evaluate(model, loader)[:2]
    assert n == 64 and acc == sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in loader) / 64
