"""Convert a trained CIFAR QCFS (or ReLU) network and evaluate it at several T (paper Table 3 style).

    python examples/convert_cifar.py --checkpoint sj_parallel_conversion/tools/checkpoints/cifar10_cnn_qcfs_L4.pt \
        --T 1 2 4 8 --calib-batches 50

For a QCFS network the row with T == L needs no calibration (lossless); other T are calibrated
with DA-QCFS (Algorithm 1) unless --no-calibration. Accuracies are spike-level (the time mean of
the T-step run); --count-domain evaluates without time steps (same predictions, faster).
Data: the project's npz CIFAR-10 (default, $SJPC_CIFAR10_DIR) or torchvision's CIFAR-10/100.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sj_parallel_conversion import (# noqa: E402
                                    predictor,
                                    CalibrationSettings, ParallelConversionRecipe, ParallelConverter)
from sj_parallel_conversion.tools import data, models  # noqa: E402
from sj_parallel_conversion.inference import evaluate  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--data", choices=["npz", "cifar10", "cifar100"], default="npz")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--calib-batches", type=int, default=None, help="default: one epoch of the training set")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--method", choices=["ema", "moment", "auto", "learned"], default="ema",
                   help="calibration method (default ema: the paper's Algorithm 1; auto/learned fit for minutes)")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--count-domain", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    ann, meta = models.load_checkpoint(args.checkpoint)
    ann = ann.to(args.device).eval()
    if args.data == "npz":
        train = data.cifar10_npz("train", root=args.data_root)
        test = data.cifar10_npz("test", root=args.data_root, limit=args.limit_test)
    else:
        train = data.torchvision_dataset(args.data, args.data_root, "train", download=args.download)
        test = data.torchvision_dataset(args.data, args.data_root, "test", download=args.download)
        if args.limit_test:
            test = torch.utils.data.Subset(test, range(min(args.limit_test, len(test))))
    calib = data.make_loader(train, args.batch_size, shuffle=True)
    test_loader = data.make_loader(test, args.batch_size)

    ann_acc = evaluate(ann, test_loader, device=args.device, desc="ANN")[0]
    print(f"{meta.get('name')} ({meta.get('act')}, L={meta.get('L')}): ANN accuracy {100 * ann_acc:.2f}%")
    rows = []
    for T in args.T:
        t0 = time.perf_counter()
        recipe = ParallelConversionRecipe(T, calib, method=args.method,
                                          calibration=CalibrationSettings(
                                              num_batches=args.calib_batches,
                                              calibrate=False if args.no_calibration else None))
        snn = ParallelConverter(recipe, device=args.device).convert(copy.deepcopy(ann))
        conv = time.perf_counter() - t0
        pred = predictor(snn, T, count_domain=args.count_domain)
        acc, n, sec = evaluate(pred, test_loader, device=args.device, desc=f"T={T}")
        rows.append({"T": T, "accuracy": acc, "calibrated": recipe.case.calibrate, "convert_s": conv,
                     "eval_s": sec, "images": n})
        print(f"T={T:3d}  SNN accuracy {100 * acc:6.2f}%  (calibrated: {recipe.case.calibrate}, "
              f"conversion {conv:.1f}s, evaluation {sec:.1f}s on {n} images)", flush=True)
    if args.json:
        write_json(args.json, {"checkpoint": args.checkpoint, "meta": meta, "ann_accuracy": ann_acc, "rows": rows},
                   default=str)
    return {"ann_accuracy": ann_acc, "rows": rows}


if __name__ == "__main__":
    main()
