"""Network-level inference speed: IF-neuron SNN vs parallel SNN (spike-level and count-domain)
vs the plain ANN, measured side by side with interleaved repetitions.

For each model and T the script converts one ReLU network three ways:

* ``if``        SpikingJelly's ``RateCodingRecipe`` (IF neurons), T steps, multi-step mode;
* ``spike``     ``ParallelConverter`` spike-level run (``[T, N, ...]`` through every layer);
* ``count``     the same converted model's :func:`count_domain_model`, built once (one pass);
* ``ann``       the ANN forward (BatchNorm folded the same way, for a fair comparison);

then times them in rounds (``ann, count, spike, if`` each round, ``--repeats`` rounds after a
warm-up) and reports median seconds, images/s, and medians of per-round ratios.

The parallel spike-level run gets the image once (``[1, N, ...]``, as :func:`spike_inference`
feeds it; ``--spike-input repeat`` feeds ``T`` copies instead); the IF-SNN gets ``T`` copies, as
SpikingJelly's rate coding needs. ``--channels-last`` puts the ANN, the count-domain model, the
parallel SNN and their inputs in channels-last memory format; ``--if-channels-last`` does the
same for the IF-SNN, so both spike-level networks can be compared in the same format. The
parallel SNN reuses memory (the recipe's ``inplace=True``, its default); ``--reuse both`` also
times it converted with ``inplace=False`` in the same rounds.

Acceptance run (CPU): ``python benchmarks/bench_network.py --models resnet20 --T 32 --batch 256
--channels-last --if-channels-last --repeats 5``
Sweep: ``python benchmarks/bench_network.py --models resnet20 vgg16 --T 4 8 16 32 64 --batch 64``
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spikingjelly.activation_based import ann2snn, functional  # noqa: E402

from sj_parallel_conversion import NetworkSettings, ParallelConverter, count_domain_model, kernels  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402
from sj_parallel_conversion.inference import repeat_input  # noqa: E402
from sj_parallel_conversion.tools.models import build_model  # noqa: E402
from sj_parallel_conversion.timing import timed  # noqa: E402
from sj_parallel_conversion.tracing import fold_bn  # noqa: E402


CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")


def _channels_last(t_or_m):
    return t_or_m.to(memory_format=torch.channels_last)


def _steps_channels_last(x_seq: torch.Tensor) -> torch.Tensor:
    """[T, N, C, H, W] whose every step is channels-last (the layout a [T*N] conv reads)."""
    T = x_seq.shape[0]
    return _channels_last(x_seq.flatten(0, 1)).view(x_seq.shape) if T else x_seq


def bench(model_name: str, T: int, batch: int, repeats: int, device: torch.device, backend: str,
          channels_last: bool = False, if_channels_last: bool = False, spike_input: str = "once",
          compile_: bool = False, reuse: str = "on"):
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
        snn_pc = ParallelConverter("parallel", T=T, dataloader=calib, progress=False, method="ema",
                                   network=NetworkSettings(backend=backend, inplace=reuse != "off")).convert(copy.deepcopy(ann))
        # The same network without memory reuse (recipe option inplace=False), for --reuse both.
        snn_plain = None
        if reuse == "both":
            snn_plain = ParallelConverter("parallel", T=T, dataloader=calib, progress=False, method="ema",
                                          network=NetworkSettings(backend=backend, inplace=False)).convert(copy.deepcopy(ann))
        # The ANN with BN folded, as the converters see it.
        ann_fused = fold_bn(torch.fx.symbolic_trace(copy.deepcopy(ann))).to(device).eval()
    x_seq = repeat_input(x, T)
    x_pc = x_seq if spike_input == "repeat" else x.unsqueeze(0)
    x_if = x_seq
    x_ann = x
    if channels_last:
        ann_fused, snn_pc = _channels_last(ann_fused), _channels_last(snn_pc)
        snn_plain = _channels_last(snn_plain) if snn_plain is not None else None
        x_ann, x_pc = _channels_last(x), _steps_channels_last(x_pc)
    if if_channels_last:
        snn_if, x_if = _channels_last(snn_if), _steps_channels_last(x_seq)
    counted = count_domain_model(snn_pc)

    def run_if():
        functional.reset_net(snn_if)
        snn_if(x_if).mean(0)

    def run_spike():
        snn_pc(x_pc).mean(0)

    fns = {
        "ann": lambda: ann_fused(x_ann),
        "count": lambda: counted(x_ann),
        "spike": run_spike,
        "if": run_if,
    }
    if reuse == "both":
        fns["spike_plain"] = lambda: snn_plain(x_pc).mean(0)
    if compile_:
        # inductor, compiled during the warm-up below (not timed); the ANN is compiled too, so
        # that "count_c/ann_c" compares like with like and "count_c/ann" against the eager ANN.
        ann_c = torch.compile(ann_fused, fullgraph=True)
        count_c = torch.compile(counted, fullgraph=True)
        fns = {"ann": fns["ann"], "ann_c": lambda: ann_c(x_ann), "count": fns["count"],
               "count_c": lambda: count_c(x_ann), "spike": run_spike, "if": run_if}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(timed(fn, device))
    ratios = {
        "if/count": statistics.median(a / b for a, b in zip(times["if"], times["count"])),
        "if/spike": statistics.median(a / b for a, b in zip(times["if"], times["spike"])),
        "count/ann": statistics.median(a / b for a, b in zip(times["count"], times["ann"])),
        "spike/ann": statistics.median(a / b for a, b in zip(times["spike"], times["ann"])),
    }
    if reuse == "both":
        ratios["spike_plain/spike"] = statistics.median(a / b for a, b in zip(times["spike_plain"], times["spike"]))
        ratios["if/spike_plain"] = statistics.median(a / b for a, b in zip(times["if"], times["spike_plain"]))
    if compile_:
        ratios["count_c/ann"] = statistics.median(a / b for a, b in zip(times["count_c"], times["ann"]))
        ratios["count_c/ann_c"] = statistics.median(a / b for a, b in zip(times["count_c"], times["ann_c"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "T": T, "batch": batch, "repeats": repeats, "device": str(device),
            "channels_last": channels_last, "if_channels_last": if_channels_last, "spike_input": spike_input,
            "reuse": reuse,
            "median_s": med, "images_per_s": {k: batch / v for k, v in med.items()}, "ratios": ratios,
            "all_s": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20"])
    p.add_argument("--T", type=int, nargs="+", default=[32])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=list(kernels.BACKENDS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--channels-last", action="store_true",
                   help="ANN, count-domain model and parallel SNN (and their inputs) in channels-last format")
    p.add_argument("--if-channels-last", action="store_true",
                   help="SpikingJelly's IF-SNN and its input in channels-last format")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile (inductor) of the ANN and of the count-domain model")
    p.add_argument("--spike-input", choices=["once", "repeat"], default="once",
                   help="parallel spike level: the image once ([1, N, ...], default) or T copies")
    p.add_argument("--reuse", choices=["on", "off", "both"], default="on",
                   help="memory reuse in the parallel SNN (recipe option inplace; default on); 'both' also "
                        "times the network converted with inplace=False in the same rounds")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for m in args.models:
        for T in args.T:
            r = bench(m, T, args.batch, args.repeats, device, args.backend, args.channels_last,
                      args.if_channels_last, args.spike_input, args.compile, args.reuse)
            results.append(r)
            print(f"{m} T={T}: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["median_s"].items()), flush=True)
            print("  ratios (medians of per-round ratios): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()), flush=True)
    from tabulate import tabulate

    rows = [[r["model"], r["T"], r["batch"], *(f"{r['images_per_s'][k]:.1f}" for k in ("ann", "count", "spike", "if")),
             *(f"{r['ratios'][k]:.2f}" for k in ("if/count", "if/spike", "count/ann"))] for r in results]
    headers = ["model", "T", "batch", "ANN img/s", "count img/s", "spike img/s", "IF img/s",
               "IF/count", "IF/spike", "count/ANN"]
    if args.compile:
        headers += ["compiled count/ANN", "compiled count/compiled ANN"]
        for row, r in zip(rows, results):
            row += [f"{r['ratios']['count_c/ann']:.2f}", f"{r['ratios']['count_c/ann_c']:.2f}"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    env = {"argv": sys.argv[1:], "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    if args.json:
        write_json(args.json, {"env": env, "results": results})
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
