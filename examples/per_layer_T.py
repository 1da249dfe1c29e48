"""Per-layer time steps on CIFAR-10: greedy search on training images, judged on held-out test images.

    python examples/per_layer_T.py --checkpoint sj_parallel_conversion/tools/checkpoints/cifar10_cnn_relu.pt \
        --T-max 32 --candidates 4 8 16 --max-loss 0.01 --calib-batches 10 --search-batches 10 --limit-test 2000

The search (``search_layer_T``) calibrates on the first ``--calib-batches`` training batches and
scores trials on the next ``--search-batches`` (never on test images). The table then compares, on
the test images: uniform ``T_max``, the per-layer ``T`` found, and uniform ``T`` equal to the
per-layer result's SOP-weighted mean (the same average cost spent evenly).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

from torch.utils.data import Subset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sj_parallel_conversion import ParallelConversionRecipe, ParallelConverter, predictor  # noqa: E402
from sj_parallel_conversion.tools import data, models  # noqa: E402
from sj_parallel_conversion.inference import evaluate  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402
from sj_parallel_conversion.layerwise import search_layer_T  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--T-max", type=int, default=32)
    p.add_argument("--candidates", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--max-loss", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=10)
    p.add_argument("--search-batches", type=int, default=10)
    p.add_argument("--limit-test", type=int, default=2000)
    p.add_argument("--data-root", default=None, help="folder with train.npz/test.npz (default $SJPC_CIFAR10_DIR)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    ann, meta = models.load_checkpoint(args.checkpoint)
    ann.eval()
    train = data.cifar10_npz("train", root=args.data_root)
    nc, ns = args.calib_batches * args.batch_size, args.search_batches * args.batch_size
    calib = data.make_loader(Subset(train, range(nc)), args.batch_size)
    search = data.make_loader(Subset(train, range(nc, nc + ns)), args.batch_size)
    test = data.make_loader(data.cifar10_npz("test", root=args.data_root, limit=args.limit_test), 256)

    res = search_layer_T(ann, calib, search, T_max=args.T_max, candidates=args.candidates,
                         max_loss=args.max_loss)
    print(res.to_text())

    def test_acc(T):
        # Algorithm 1, as the search itself uses: both columns compare the same calibration.
        snn = ParallelConverter(ParallelConversionRecipe(T, calib, progress=False, method="ema")).convert(
            copy.deepcopy(ann))
        return evaluate(predictor(snn, T, count_domain=True), test, progress=False)[0]  # built once

    weighted = max(1, round(res.weighted_T))
    rows = [("ANN", "-", evaluate(ann, test, progress=False)[0]),
            (f"uniform T={args.T_max}", f"{args.T_max:.2f}", test_acc(args.T_max)),
            ("per-layer T", f"{res.weighted_T:.2f}", test_acc(res.T)),
            (f"uniform T={weighted}", f"{weighted:.2f}", test_acc(weighted))]
    print(f"\n{meta.get('name')} ({meta.get('act')}), {len(test.dataset)} test images")
    print("| setting | SOP-weighted T | test acc % |\n|---|---|---|")
    for name, t, acc in rows:
        print(f"| {name} | {t} | {100 * acc:.2f} |")
    if args.json:
        write_json(args.json, {"T": res.T, "weighted_T": res.weighted_T, "mean_T": res.mean_T,
                               "rows": [{"setting": n, "T": t, "accuracy": a} for n, t, a in rows]})
    return rows


if __name__ == "__main__":
    main()
