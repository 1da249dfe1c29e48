"""Network-level inference speed: IF-neuron SNN vs parallel SNN (spike-level and count-domain)
vs the plain ANN, measured side by side with interleaved repetitions.

For each model and T the script converts one ReLU network three ways:

* ``if``        SpikingJelly's ``RateCodingRecipe`` (IF neurons), T steps, multi-step mode;
* ``spike``     ``ParallelConverter`` spike-level run (``[T, N, ...]`` through every layer);
* ``count``     the same converted model through :func:`count_inference` (one pass);
* ``ann``       the ANN forward (BatchNorm folded the same way, for a fair comparison);

then times them in rounds (``ann, count, spike, if`` each round, ``--repeats`` rounds after a
warm-up) and reports median seconds, images/s, and medians of per-round ratios.

Acceptance run (CPU): ``python benchmarks/bench_network.py --models resnet20 --T 32 --batch 256``
Sweep: ``python benchmarks/bench_network.py --models resnet20 vgg16 --T 4 8 16 32 64 --batch 64``
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spikingjelly.activation_based import ann2snn, functional  # noqa: E402

from sj_parallel_conversion import ParallelConverter, count_inference  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402
from sj_parallel_conversion.inference import repeat_input  # noqa: E402
from sj_parallel_conversion.models import build_model  # noqa: E402


CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench(model_name: str, T: int, batch: int, repeats: int, device: torch.device, backend: str):
    torch.manual_seed(0)
    # SpikingJelly's RateCodingRecipe cannot adapt the F.pad of option-A shortcuts to multi-step
    # mode, so the CIFAR ResNets use option B (1x1 conv + BN) here; both converters handle B.
    kwargs = {"shortcut": "B"} if model_name in CIFAR_RESNETS else {}
    ann = build_model(model_name, num_classes=10, act="relu", **kwargs).eval().to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    calib = [torch.randn(min(batch, 64), 3, 32, 32, device=device)]
    with torch.no_grad():
        snn_if = ann2snn.Converter(ann2snn.RateCodingRecipe(calib, mode="max")).convert(copy.deepcopy(ann))
        functional.set_step_mode(snn_if, "m")
        snn_pc = ParallelConverter("parallel", T=T, dataloader=calib, progress=False,
                                   backend=backend).convert(copy.deepcopy(ann))
        # The ANN with BN folded, as the converters see it.
        from spikingjelly.activation_based.ann2snn.recipes.rate_coding import _fuse_conv_bn
        ann_fused = _fuse_conv_bn(torch.fx.symbolic_trace(copy.deepcopy(ann))).to(device).eval()
    x_seq = repeat_input(x, T)

    def run_if():
        functional.reset_net(snn_if)
        snn_if(x_seq).mean(0)

    def run_spike():
        snn_pc(x_seq).mean(0)

    fns = {
        "ann": lambda: ann_fused(x),
        "count": lambda: count_inference(snn_pc, x),
        "spike": run_spike,
        "if": run_if,
    }
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(_timed(fn, device))
    ratios = {
        "if/count": statistics.median(a / b for a, b in zip(times["if"], times["count"])),
        "if/spike": statistics.median(a / b for a, b in zip(times["if"], times["spike"])),
        "count/ann": statistics.median(a / b for a, b in zip(times["count"], times["ann"])),
        "spike/ann": statistics.median(a / b for a, b in zip(times["spike"], times["ann"])),
    }
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "T": T, "batch": batch, "repeats": repeats, "device": str(device),
            "median_s": med, "images_per_s": {k: batch / v for k, v in med.items()}, "ratios": ratios,
            "all_s": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--T", type=int, nargs="+", default=[32])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cupy"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for m in args.models:
        for T in args.T:
            r = bench(m, T, args.batch, args.repeats, device, args.backend)
            results.append(r)
            print(f"{m} T={T}: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["median_s"].items()), flush=True)
    from tabulate import tabulate

    rows = [[r["model"], r["T"], r["batch"], *(f"{r['images_per_s'][k]:.1f}" for k in ("ann", "count", "spike", "if")),
             *(f"{r['ratios'][k]:.2f}" for k in ("if/count", "if/spike", "count/ann"))] for r in results]
    print(tabulate(rows, headers=["model", "T", "batch", "ANN img/s", "count img/s", "spike img/s", "IF img/s",
                                  "IF/count", "IF/spike", "count/ANN"], tablefmt="github"))
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.json:
        write_json(args.json, {"env": env, "results": results})
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
