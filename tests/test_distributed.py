"""Two gloo processes calibrate on their shards and end with the single-process parameters."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from sj_parallel_conversion import CalibrationSettings, ParallelConverter, count_inference
from sj_parallel_conversion.inference import evaluate
from sj_parallel_conversion.distributed import allreduce_reducer, distributed_evaluate, shard_indices
from sj_parallel_conversion.learned import DistillCalibration, LearnedCalibration

BATCH = 16  # per rank


def _model(method=None):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    if method == "auto":
        # With its last bias zeroed and T = 1, no calibration misses enough of the 16 selection
        # images and their 48 blends for auto to measure every candidate.
        with torch.no_grad():
            model[-1].bias.zero_()
    return model


def _T(method):
    return 1 if method == "auto" else 4


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (128,), generator=g)
    return x, y


def _options(method):
    if method == "learned":
        # Equal to one process only where every draw is the same: Algorithm 1's start (mse thresholds
        # sample values per process) and no views (drawn per process).
        return dict(method="learned", calibration=CalibrationSettings(learned=LearnedCalibration(
            steps=12, eval_every=4, patience=1, cuts=1, batch_size=BATCH, start="ema", views=0)))
    if method == "auto":
        # Every candidate fitted and scored; the choice's sign test sums its paired counts over ranks.
        return dict(method="auto", calibration=CalibrationSettings(skip_agreement=None, distill=DistillCalibration(
            steps=12, eval_every=4, batch_size=BATCH, views=0)))
    return dict(method=method)


def _worker(rank, world, init_file, out_dir, method):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = _data()
        idx = list(shard_indices(len(x), rank, world))
        xs, ys = x[idx], y[idx]
        loader = [(xs[i:i + BATCH], ys[i:i + BATCH]) for i in range(0, len(xs), BATCH)]
        snn = ParallelConverter("parallel", T=_T(method), dataloader=loader, progress=False,
                                reducer=allreduce_reducer(), **_options(method)).convert(_model(method))
        acc, n, _ = distributed_evaluate(lambda b: count_inference(snn, b), loader)
        report = snn.calibration_report
        torch.save({"state": snn.state_dict(), "acc": acc, "n": n, "method": report.method if report else None,
                    "scores": report.scores if report else None}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
@pytest.mark.parametrize("method", ["ema", "learned", "auto"])
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
        options["calibration"] = CalibrationSettings(learned=LearnedCalibration(
            steps=12, eval_every=4, patience=1, cuts=1, batch_size=world * BATCH, start="ema", views=0))
    ref = ParallelConverter("parallel", T=_T(method), dataloader=union, progress=False,
                            **options).convert(_model(method)).state_dict()
    assert r0["state"].keys() == ref.keys()
    for k in ref:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"ranks disagree on {k}"
        if method in ("learned", "auto"):
            # Each process spreads its held-out images over its own shard, so the fitting images of
            # the union differ from one process's split: the ranks agree with each other (above),
            # not bit for bit with a single process.
            continue
        torch.testing.assert_close(r0["state"][k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs from single process")
    if method == "auto":
        # The ranks chose together, from scores summed over both shards' selection images.
        assert r0["method"] == r1["method"] and r0["scores"] == r1["scores"]
        assert {"none", "ema", "mse", "distill"} == set(r0["scores"])
        none = r0["scores"]["none"]
        assert round((1 - none["agreement"]) * none["images"]) > 4
        assert r0["n"] == r1["n"] == len(x) and r0["acc"] == r1["acc"]
        return
    # Calibration moved psi_da or phi_da (spike_value - v_threshold) away from
    # their initial 0 at some node, so equal results above are not equal defaults.
    nodes = sorted({k.rpartition(".")[0] for k in ref if k.endswith(".spike_value")})
    assert nodes, "no parallel neuron in the converted model"
    assert any(ref[f"{n}.psi_da"].abs().max() > 1e-4
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


# -- issue 24, fault 2: the group's device, set_device before init, the group destroyed ------------
class FakeDist:
    """A stand-in for ``torch.distributed`` with a group of ``world`` processes whose backend
    configuration is ``config``; it records every call, and its all_reduce fails like NCCL or
    gloo on a tensor whose device the backend does not serve."""

    ReduceOp = type("ReduceOp", (), {"SUM": "sum", "MAX": "max"})

    def __init__(self, config, world=2, initialized=True):
        self.config, self.world, self.initialized, self.calls = config, world, initialized, []

    def is_available(self):
        return True

    def is_initialized(self):
        return self.initialized

    def get_world_size(self, group=None):
        return self.world

    def get_backend_config(self, group=None):
        return self.config

    def init_process_group(self, backend=None, **kwargs):
        self.calls.append(("init_process_group", backend))
        self.initialized = True

    def destroy_process_group(self, group=None):
        self.calls.append(("destroy_process_group",))
        self.initialized = False

    def all_reduce(self, tensor, op=None, group=None):
        self.calls.append(("all_reduce", tensor.device, op))
        served = {part.split(":")[0] for part in self.config.split(",")}
        stand_in = {"meta": "cuda"}.get(tensor.device.type, tensor.device.type)  # meta plays a GPU
        if stand_in not in served:
            raise RuntimeError(f"{self.config}: no backend for {tensor.device} tensors")
        if tensor.device.type != "meta":
            tensor.mul_(self.world)  # as if every rank held the same values


def _fake(monkeypatch, config, **kwargs):
    from sj_parallel_conversion import distributed

    fake = FakeDist(config, **kwargs)
    monkeypatch.setattr(distributed, "dist", fake)
    return distributed, fake


class _Reduced(Exception):
    pass


def test_nccl_group_receives_only_gpu_tensors_from_the_reducer(monkeypatch):
    """learned.py all-reduces CPU float64 tensors (totals, counts) and parameter gradients: under
    an NCCL-only group every tensor handed to all_reduce is on the GPU (meta stands in for it)."""
    distributed, fake = _fake(monkeypatch, "cuda:nccl")
    monkeypatch.setattr(distributed, "_current_cuda_device", lambda: torch.device("meta"))
    real = fake.all_reduce

    def record_then_stop(tensor, op=None, group=None):
        real(tensor, op, group)
        raise _Reduced  # a meta tensor cannot be copied back; what reached all_reduce is the point

    fake.all_reduce = record_then_stop
    reduce = allreduce_reducer()
    for t, op in ((torch.tensor([3.0, 0.5, 64.0], dtype=torch.float64), "sum"),
                  (torch.tensor([1.0, 4.0], dtype=torch.float64), "sum"),
                  (torch.randn(8), "max")):
        with pytest.raises(_Reduced):
            reduce(t, op)
    assert [c[1].type for c in fake.calls] == ["meta"] * 3
    assert [c[2] for c in fake.calls] == ["sum", "sum", "max"]


def test_gloo_results_are_new_tensors_and_inputs_are_untouched(monkeypatch):
    distributed, fake = _fake(monkeypatch, "cpu:gloo")
    t = torch.tensor([1.0, 2.0])
    out = allreduce_reducer()(t, "max")
    assert fake.calls[-1][1].type == "cpu"
    assert torch.equal(out, torch.tensor([2.0, 4.0])) and torch.equal(t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="op must be one of"):
        distributed.all_reduce(t, "mean")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")
@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_cpu_statistics_reduce_under_nccl_and_come_back_to_the_cpu(tmp_path, backend):
    """One process, a real NCCL group: a CPU float64 tensor (learned.py's totals) is reduced on
    the GPU (NCCL-only) or over gloo (mixed group) and returned on the CPU."""
    from sj_parallel_conversion import distributed

    torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        t = torch.tensor([3.0, 0.5, 64.0], dtype=torch.float64)
        want_where = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        assert distributed.collective_device("cpu") == want_where
        out = distributed.all_reduce(t, "sum")
        assert out.device == t.device and torch.equal(out, t) and out.data_ptr() != t.data_ptr()
        g = torch.randn(5, device="cuda")
        assert torch.equal(distributed.all_reduce(g, "max"), g)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("config, device, where", [
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),     # the mixed group: CPU tensors over gloo
    ("cpu:gloo,cuda:nccl", "meta", "meta"),   # (meta: not served, so it shows the fallback below)
    ("cuda:nccl", "cpu", "cuda:3"),
    ("cpu:gloo,cuda:gloo", "cpu", "cpu"),
])
def test_collective_device_follows_the_group_backend(monkeypatch, config, device, where):
    distributed, _ = _fake(monkeypatch, config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    if device == "meta":
        assert distributed.collective_device(device) == torch.device("cuda", 3)
    else:
        assert distributed.collective_device(device) == torch.device(where)


@pytest.mark.parametrize("device, cuda, events", [
    (None, True, [("set_device", torch.device("cuda", 1)), ("init_process_group", "cpu:gloo,cuda:nccl")]),
    ("cuda", True, [("set_device", torch.device("cuda", 1)), ("init_process_group", "cpu:gloo,cuda:nccl")]),
    ("cpu", True, [("init_process_group", "gloo")]),
    (None, False, [("init_process_group", "gloo")]),
])
def test_init_from_env_picks_the_backend_from_the_device_and_sets_it_first(monkeypatch, device, cuda, events):
    distributed, fake = _fake(monkeypatch, "unused", initialized=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: fake.calls.append(("set_device", torch.device(d))))
    exits = []
    monkeypatch.setattr(distributed.atexit, "register", exits.append)
    assert distributed.init_from_env(device=device) is True
    assert fake.calls == events
    assert exits == [distributed.shutdown]  # the command line's group is destroyed at exit
    distributed.shutdown()
    distributed.shutdown()  # twice is fine
    assert fake.calls[len(events):] == [("destroy_process_group",)] and not fake.is_initialized()


def test_process_group_destroys_only_the_group_it_created(monkeypatch):
    distributed, fake = _fake(monkeypatch, "unused", initialized=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    with distributed.process_group() as joined:
        assert joined and fake.is_initialized()
    assert fake.calls == [("init_process_group", "gloo"), ("destroy_process_group",)]
    fake.calls.clear()
    fake.initialized = True  # a group someone else made
    with distributed.process_group() as joined:
        assert joined
    assert fake.calls == [] and fake.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.process_group() as joined:
        assert not joined


def _env_worker(rank, world, port, out_dir):
    from sj_parallel_conversion import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.process_group(device="cpu") as joined:
        config = dist.get_backend_config()
        reduce = allreduce_reducer()
        total = reduce(torch.tensor([rank + 1.0, 10.0], dtype=torch.float64), "sum")
        top = reduce(torch.tensor([float(rank), -float(rank)]), "max")
    torch.save({"joined": joined, "config": config, "total": total, "top": top,
                "after": dist.is_initialized()}, os.path.join(out_dir, f"env{rank}.pt"))


@pytest.mark.slow  # spawns two processes
def test_two_processes_join_from_torchrun_environment_and_leave(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_env_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / f"env{r}.pt")
        assert res["joined"] and "cpu:gloo" in res["config"] and not res["after"]
        assert torch.equal(res["total"], torch.tensor([3.0, 20.0], dtype=torch.float64))
        assert torch.equal(res["top"], torch.tensor([1.0, 0.0]))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_worker(rank, world, ports, out_dir, runs):
    """Each command line as torchrun would start it on this rank: its exit status and output."""
    import contextlib
    import io
    import json

    from sj_parallel_conversion.tools import cli

    import time

    torch.set_num_threads(1)
    results = []
    for i, (port, argv) in enumerate(zip(ports, runs)):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                          LOCAL_RANK=str(rank))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in argv])
        results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
        # torchrun starts the next command once every process of this one has ended
        open(os.path.join(out_dir, f"done{i}.{rank}"), "w").close()
        while not all(os.path.exists(os.path.join(out_dir, f"done{i}.{r}")) for r in range(world)):
            time.sleep(0.05)
    with open(os.path.join(out_dir, f"cli{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow  # spawns two processes
def test_command_line_under_torchrun_converts_and_evaluates_once_and_refuses_other_commands(tmp_path):
    """distributed.rst: convert and evaluate run under torchrun, only rank 0 prints and writes;
    the other subcommands exit with status 2."""
    import json

    from sj_parallel_conversion import load_snn
    from sj_parallel_conversion.tools import models

    torch.manual_seed(0)
    ckpt, snn, table = tmp_path / "digits.pt", tmp_path / "snn.pt", tmp_path / "eval.json"
    models.save_checkpoint(str(ckpt), models.build_model("digits_cnn", in_channels=1), name="digits_cnn", act="relu",
                           L=8, num_classes=10, in_channels=1)
    data = ["--data", "digits", "--batch-size", "32", "--no-progress"]
    runs = [["convert", "--checkpoint", ckpt, "--T", "2", "--out", snn, "--method", "ema", "--calib-images", "64", *data],
            ["evaluate", "--snn", snn, "--json", table, *data],
            ["stats", "--snn", snn, "--images", "8", *data]]
    mp.spawn(_cli_worker, args=(2, [_free_port() for _ in runs], str(tmp_path), runs), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"cli{r}.json").read_text()) for r in range(2)]
    for rank, (convert, evaluate_, stats) in enumerate(ranks):
        assert convert["code"] == 0 and evaluate_["code"] == 0, ranks
        assert stats["code"] == 2 and "'stats' does not run under torchrun" in stats["err"], stats
    assert ranks[0][1]["out"].strip() and not ranks[1][0]["out"] and not ranks[1][1]["out"]  # rank 0 prints
    load_snn(snn)
    (row,) = json.loads(table.read_text())["rows"]
    assert row["images"] == 450  # every test image, from both shards
