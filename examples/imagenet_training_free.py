"""Training-free conversion of torchvision ImageNet ResNets at T = 8..64 (paper Table 4 style).

    python examples/imagenet_training_free.py --data-root /path/to/imagenet --weights resnet34.pth \
        --depth 34 --T 8 16 32 64 --calib-root /path/to/imagenet --calib-images 1024

The ANN is ``torchvision.models.resnetXX`` with weights from a local file (nothing is downloaded).
Its shared ``relu`` modules are split per call site so each becomes its own neuron layer. As in
the paper (appendix A.2), the stem's ReLU stays analog and every other ReLU becomes a parallel
neuron; ``--no-keep-stem-analog`` converts the stem too.

Calibration reads ``--calib-root`` (required; its ``train`` sub-folder where there is one) and
evaluation ``--data-root`` (its ``val`` or ``test`` sub-folder where there is one): the paper
calibrates on training images, and calibrating on the images it then scores would inflate the
accuracy, so the two must resolve to different folders. Calibration images are the first
``--calib-images`` of one seeded shuffle.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sj_parallel_conversion import NetworkSettings, ParallelConversionRecipe, ParallelConverter, predictor  # noqa: E402
from sj_parallel_conversion.tools import data, models  # noqa: E402
from sj_parallel_conversion.inference import evaluate  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True,
                   help="ImageFolder for evaluation (its val/ or test/ sub-folder where there is one)")
    p.add_argument("--calib-root", required=True,
                   help="ImageFolder for calibration, not the evaluation folder (its train/ sub-folder where there "
                        "is one)")
    p.add_argument("--depth", type=int, choices=[18, 34, 50, 101], default=18)
    p.add_argument("--weights", default=None, help="local state_dict file of the torchvision model")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib-images", type=int, default=1024, help="calibration images (default 1024)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--keep-stem-analog", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the stem ReLU analog, as the paper does (default; --no-keep-stem-analog converts it)")
    p.add_argument("--count-domain", action="store_true", help="evaluate without time steps (same predictions)")
    p.add_argument("--method", choices=["ema", "moment", "auto", "learned"], default="ema",
                   help="calibration: ema (the paper's Algorithm 1, default), moment, auto or learned "
                        "(a fit of minutes to hours on a CPU for ImageNet-sized networks)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    test = data.torchvision_dataset("imagefolder", args.data_root, "test", image_size=args.image_size)
    if args.limit:
        test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))
    # The "train" split only picks the folder; calibration reads with the evaluation transforms.
    calib_set = data.torchvision_dataset("imagefolder", args.calib_root, "train", image_size=args.image_size)
    calib_folder, test_folder = (os.path.realpath(d.root) for d in (calib_set, data_set_of(test)))
    if calib_folder == test_folder or test_folder.startswith(calib_folder + os.sep) or \
            calib_folder.startswith(test_folder + os.sep):
        raise SystemExit(f"imagenet_training_free.py: error: --calib-root {args.calib_root} resolves to "
                         f"{calib_folder}, which holds the evaluation images of --data-root ({test_folder}); "
                         "calibrate on other images (the training set)")
    order = torch.randperm(len(calib_set), generator=torch.Generator().manual_seed(0))[:args.calib_images]
    calib = data.make_loader(torch.utils.data.Subset(calib_set, order.tolist()), args.batch_size)
    test_loader = data.make_loader(test, args.batch_size)
    stem = ["relu"] if args.keep_stem_analog else []  # the stem's ReLU is the first call of resnet.relu

    ann = models.torchvision_resnet(args.depth, num_classes=args.num_classes, weights_path=args.weights)
    ann = ann.to(args.device).eval()

    ann_acc = evaluate(ann, test_loader, device=args.device, desc="ANN")[0]
    print(f"ResNet-{args.depth}: ANN accuracy {100 * ann_acc:.2f}%")
    rows = []
    for T in args.T:
        t0 = time.perf_counter()
        recipe = ParallelConversionRecipe(T, calib, method=args.method, network=NetworkSettings(analog_sites=stem))
        snn = ParallelConverter(recipe, device=args.device).convert(copy.deepcopy(ann))
        conv = time.perf_counter() - t0
        pred = predictor(snn, T, count_domain=args.count_domain)
        acc, n, sec = evaluate(pred, test_loader, device=args.device, desc=f"T={T}")
        rows.append({"T": T, "accuracy": acc, "loss": ann_acc - acc, "convert_s": conv, "eval_s": sec})
        print(f"T={T:3d}  SNN accuracy {100 * acc:6.2f}% ({100 * (acc - ann_acc):+.2f})  "
              f"conversion {conv:.1f}s, evaluation {sec:.1f}s on {n} images", flush=True)
    result = {"depth": args.depth, "ann_accuracy": ann_acc, "rows": rows, "analog_sites": stem,
              "calibration_folder": calib_folder, "calibration_images": len(calib.dataset),
              "evaluation_folder": test_folder}
    if args.json:
        write_json(args.json, result)
    return {**result, "snn": snn}


def data_set_of(ds):
    """The dataset under any ``Subset`` wrappers."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return ds


if __name__ == "__main__":
    main()
