"""Count domain vs ANN only: the eager count-domain model's time relative to the ANN's.

A quicker companion of ``bench_network.py`` (which also times the spike-level and IF networks,
minutes per round at T = 32): the same ANN (BN folded) and the same converted network's
:func:`count_domain_model`, timed in interleaved rounds after a warm-up; medians and the median
of per-round ratios ``count / ANN``.

Acceptance run (CPU)::

    python benchmarks/bench_count.py --model resnet20 --T 32 --batch 256 --repeats 9 --threads 2
    python benchmarks/bench_count.py --model resnet20 --T 32 --batch 256 --repeats 9 --threads 2 --channels-last
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sj_parallel_conversion import ParallelConverter, count_domain_model  # noqa: E402
from sj_parallel_conversion.tools.models import build_model  # noqa: E402
from sj_parallel_conversion.timing import timed  # noqa: E402
from sj_parallel_conversion.tracing import fold_bn  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--T", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"shortcut": "B"} if args.model.startswith("resnet") and args.model[6:].isdigit() else {}
    ann = build_model(args.model, num_classes=10, act="relu", **kwargs).eval()
    calib = [torch.randn(64, 3, 32, 32)]
    snn = ParallelConverter("parallel", T=args.T, dataloader=calib, progress=False,
                            method="ema").convert(copy.deepcopy(ann))
    ann_fused = fold_bn(torch.fx.symbolic_trace(copy.deepcopy(ann))).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    if args.channels_last:
        ann_fused, snn, x = (t.to(memory_format=torch.channels_last) for t in (ann_fused, snn, x))
    counted = count_domain_model(snn)
    fns = {"ann": lambda: ann_fused(x), "count": lambda: counted(x)}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(c / a for a, c in zip(times["ann"], times["count"]))
    print(f"{args.model} T={args.T} batch={args.batch} channels_last={args.channels_last} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}: ANN {med['ann']:.3f}s, "
          f"count {med['count']:.3f}s, count/ANN {ratio:.2f} (median of per-round ratios)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "median_s": med, "count/ann": ratio, "all_s": times}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
