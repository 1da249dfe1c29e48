"""What the default calibration (``method="auto"``) costs: wall time per candidate and peak memory.

Converts one checkpoint once, in this fresh process, and prints the time of each candidate fit
(from the model's ``calibration_report``), the total conversion time and the process's peak
resident memory before and after the conversion (``getrusage``; Linux reports kilobytes).

    python benchmarks/calibration_cost.py \\
        --checkpoint sj_parallel_conversion/tools/checkpoints/cifar10_resnet20_relu.pt --T 4 --threads 2
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sj_parallel_conversion import ParallelConverter  # noqa: E402
from sj_parallel_conversion.tools import data, models  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="sj_parallel_conversion/tools/checkpoints/cifar10_resnet20_relu.pt")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--method", default="auto", choices=["auto", "learned", "ema", "moment"])
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ann, _ = models.load_checkpoint(args.checkpoint)
    batches = list(torch.split(data.cifar10_npz("train", limit=args.calib_images).tensors[0], args.batch_size))
    before = peak_mib()
    start = time.perf_counter()
    snn = ParallelConverter("parallel", T=args.T, dataloader=batches, method=args.method,
                            progress=False).convert(ann.eval())
    total = time.perf_counter() - start
    after = peak_mib()
    report = snn.calibration_report
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{os.path.basename(args.checkpoint)}, T={args.T}, method={args.method}, "
          f"{args.calib_images} calibration images")
    if report is not None:
        print(report.summary())
        for name, s in report.seconds.items():
            print(f"  fit {name:<8} {s:7.1f} s")
        if report.learned:
            print(f"  learned: {report.learned.get('steps_run')} steps run, kept step {report.learned.get('kept_step')}")
    print(f"conversion total: {total:.1f} s")
    print(f"peak resident memory: {before:.0f} MiB before conversion, {after:.0f} MiB after "
          f"(+{after - before:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
