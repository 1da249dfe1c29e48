"""Training-free conversion of torchvision ImageNet ResNets at T = 8..64 (paper Table 4 style).

    python examples/imagenet_training_free.py --data-root /path/to/imagenet/val --weights resnet34.pth \
        --depth 34 --T 8 16 32 64 --calib-root /path/to/imagenet/train --calib-batches 100

The ANN is ``torchvision.models.resnetXX`` with weights from a local file (nothing is downloaded).
Its shared ``relu`` modules are split per call site so each becomes its own neuron layer; every
ReLU is converted unless --keep-stem-analog, which keeps the stem's ReLU analog as the paper does.
Calibration uses --calib-root (an ImageFolder, default: the evaluation folder, which a paper run
should not do) and evaluation the --data-root ImageFolder.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sj_parallel_conversion import ParallelConversionRecipe, ParallelConverter, predictor  # noqa: E402
from sj_parallel_conversion import data, models  # noqa: E402
from sj_parallel_conversion.compare import evaluate  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="ImageFolder used for evaluation")
    p.add_argument("--calib-root", default=None, help="ImageFolder used for calibration")
    p.add_argument("--depth", type=int, choices=[18, 34, 50, 101], default=18)
    p.add_argument("--weights", default=None, help="local state_dict file of the torchvision model")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-batches", type=int, default=100)
    p.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--keep-stem-analog", action="store_true", help="keep the stem ReLU analog, as the paper does")
    p.add_argument("--count-domain", action="store_true", help="evaluate without time steps (same predictions)")
    p.add_argument("--method", choices=["ema", "moment", "auto", "learned"], default="ema",
                   help="calibration: ema (the paper's Algorithm 1, default), moment, auto or learned "
                        "(a fit of minutes to hours on a CPU for ImageNet-sized networks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    ann = models.torchvision_resnet(args.depth, num_classes=args.num_classes, weights_path=args.weights)
    ann = ann.to(args.device).eval()
    test = data.torchvision_dataset("imagefolder", args.data_root, "test", image_size=args.image_size)
    if args.limit:
        test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))
    calib_set = data.torchvision_dataset("imagefolder", args.calib_root or args.data_root, "test",
                                         image_size=args.image_size)
    calib = data.make_loader(calib_set, args.batch_size, shuffle=True)
    test_loader = data.make_loader(test, args.batch_size)

    ann_acc = evaluate(ann, test_loader, device=args.device, desc="ANN")[0]
    print(f"ResNet-{args.depth}: ANN accuracy {100 * ann_acc:.2f}%")
    rows = []
    for T in args.T:
        t0 = time.perf_counter()
        recipe = ParallelConversionRecipe(T, calib, num_batches=args.calib_batches, method=args.method,
                                          analog_sites=["relu"] if args.keep_stem_analog else ())
        snn = ParallelConverter(recipe, device=args.device).convert(copy.deepcopy(ann))
        conv = time.perf_counter() - t0
        pred = predictor(snn, T, count_domain=args.count_domain)
        acc, n, sec = evaluate(pred, test_loader, device=args.device, desc=f"T={T}")
        rows.append({"T": T, "accuracy": acc, "loss": ann_acc - acc, "convert_s": conv, "eval_s": sec})
        print(f"T={T:3d}  SNN accuracy {100 * acc:6.2f}% ({100 * (acc - ann_acc):+.2f})  "
              f"conversion {conv:.1f}s, evaluation {sec:.1f}s on {n} images", flush=True)
    if args.json:
        write_json(args.json, {"depth": args.depth, "ann_accuracy": ann_acc, "rows": rows})
    return {"ann_accuracy": ann_acc, "rows": rows}


if __name__ == "__main__":
    main()
