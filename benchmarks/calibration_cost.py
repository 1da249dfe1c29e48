"""What calibration costs: wall time per method and per candidate, and peak memory.

Converts one network (a project checkpoint, or ``--model`` with ``--weights``) with each method
asked for, in this fresh process, and prints the time of each candidate fit (from the model's
``calibration_report``), the seconds ``auto`` spent on fits it did not keep, the total
conversion time and the process's peak resident memory before and after each conversion
(``getrusage``, a peak over the whole process: after the first method it shows only growth beyond
the earlier peaks; Linux reports kilobytes). Methods after the first start with warm caches.

    python benchmarks/calibration_cost.py \\
        --checkpoint sj_parallel_conversion/tools/checkpoints/cifar10_resnet20_relu.pt --T 4 --threads 2
    PYTHONPATH=tests python benchmarks/calibration_cost.py --model pretrained_resnets:resnet32 \\
        --weights ../shared/data/pretrained_cifar10_resnets/resnet32-d509ac18.th \\
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --T 4 --method learned distill --threads 2

With several ``--method``, each is converted in turn in this process and its time is printed as
a ratio to the first's (measure on an otherwise idle machine: the load average is printed).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sj_parallel_conversion import ParallelConverter, load_user_model  # noqa: E402
from sj_parallel_conversion.tools import data, models  # noqa: E402

FITS = ("learned", "distill")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="sj_parallel_conversion/tools/checkpoints/cifar10_resnet20_relu.pt")
    p.add_argument("--model", help="MODULE:CALLABLE, a zoo name or torchvision:NAME (with --weights), instead "
                                   "of --checkpoint")
    p.add_argument("--weights", help="state_dict file for --model")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="input normalisation (default CIFAR-10's)")
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--method", nargs="+", default=["auto"],
                   choices=["auto", "distill", "learned", "mse", "ema", "moment", "paper"],
                   help="one or more methods, converted one after the other in this process; with two or "
                        "more, each one's time is also given as a ratio to the first's")
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.weights and not args.model:
        p.error("--weights needs --model (a project checkpoint is given with --checkpoint)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        ann, name = load_user_model(args.model, args.weights), os.path.basename(args.weights or args.model)
    else:
        ann, name = models.load_checkpoint(args.checkpoint)[0], os.path.basename(args.checkpoint)
    ann.eval()
    batches = list(torch.split(data.cifar10_npz("train", limit=args.calib_images, mean=args.mean,
                                                std=args.std).tensors[0], args.batch_size))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"1-minute load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{name}, T={args.T}, {args.calib_images} calibration images")
    totals = {}
    for method in args.method:
        before = peak_mib()
        start = time.perf_counter()
        snn = ParallelConverter("parallel", T=args.T, dataloader=batches, method=method,
                                progress=False).convert(copy.deepcopy(ann))
        totals[method] = total = time.perf_counter() - start
        after = peak_mib()
        report = snn.calibration_report
        print(f"method={method}: conversion {total:.1f} s, load average {os.getloadavg()[0]:.2f} after it")
        if report is not None:
            print("  " + report.summary())
            for candidate, seconds in report.seconds.items():
                print(f"  fit {candidate:<8} {seconds:7.1f} s{'  (kept)' if candidate == report.method else ''}")
            unkept = sum(v for c, v in report.seconds.items() if c != report.method and c in FITS)
            print(f"  seconds on learned/distilled fits not kept: {unkept:.1f}; on all candidates not kept: "
                  f"{sum(v for c, v in report.seconds.items() if c != report.method):.1f}")
            if report.learned:
                print(f"  fit: {report.learned.get('steps_run')} steps run, kept step {report.learned.get('kept_step')}")
        print(f"  peak resident memory: {before:.0f} MiB before, {after:.0f} MiB after (+{after - before:.0f} MiB)")
    first = args.method[0]
    for method in args.method[1:]:
        print(f"time ratio {method} / {first}: {totals[method] / totals[first]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
