"""One calibration against none on all 10,000 CIFAR-10 test images (count domain).

The calibration tables use 2,000 class-balanced test images, whose noise is about 0.7 points;
this checks a small difference there on the whole test set. The calibration is built from the
images ``method="auto"`` builds its candidates on (its fitting images, 70 % of the 1,024
calibration images; auto records the per-channel maxima on all 1,024, this script on those
only, so the networks are close to auto's, not identical). Prints test accuracy and agreement
with the ANN's top-1 prediction. Run from the
repository root with ``SJPC_CIFAR10_DIR`` set, for example::

    python benchmarks/full_test_set_check.py --checkpoint sj_parallel_conversion/tools/checkpoints/cifar10_cnn_relu.pt --T 16 --method mse
"""
import argparse, copy, os, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import torch

from sj_parallel_conversion import CalibrationSettings, ParallelConverter, count_domain_model, load_user_model
from sj_parallel_conversion.learned import split_images
from sj_parallel_conversion.tools import data, models

ap = argparse.ArgumentParser()
ap.add_argument("--checkpoint")
ap.add_argument("--model")
ap.add_argument("--weights")
ap.add_argument("--mean", type=float, nargs=3)
ap.add_argument("--std", type=float, nargs=3)
ap.add_argument("--T", type=int, required=True)
ap.add_argument("--method", default="mse", choices=["ema", "mse", "paper", "moment"])
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
if bool(a.checkpoint) == bool(a.model):
    ap.error("give --checkpoint, or --model with --weights")
torch.set_num_threads(a.threads)
norm = dict(mean=a.mean, std=a.std)
calib = data.cifar10_npz("train", limit=1024, **norm).tensors[0]
tx, ty = data.cifar10_npz("test", **norm).tensors
ann = (models.load_checkpoint(a.checkpoint)[0] if a.checkpoint else load_user_model(a.model, a.weights)).eval()
settings = CalibrationSettings()
rest, _ = split_images([calib], settings.selection_fraction)
fit, _ = split_images(rest, settings.distill.holdout)


def top1(model):
    with torch.no_grad():
        return torch.cat([model(c) for c in torch.split(tx, 1000)]).argmax(1)


ann_top = top1(ann)
print(f"ANN {100 * float((ann_top == ty).float().mean()):.2f} % on {len(ty)} test images; T={a.T}, "
      f"calibration on {fit[0].shape[0]} images")
for method in ("none", a.method):
    kw = dict(calibration=CalibrationSettings(calibrate=False)) if method == "none" else dict(method=method)
    snn = ParallelConverter("parallel", T=a.T, dataloader=fit, progress=False, **kw).convert(copy.deepcopy(ann))
    out = top1(count_domain_model(snn))
    print(f"  {method:5s} accuracy {100 * float((out == ty).float().mean()):.2f} %, "
          f"agrees with the ANN on {100 * float((out == ann_top).float().mean()):.2f} %", flush=True)
