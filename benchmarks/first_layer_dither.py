"""Does dither help the first layers at small ``T``? A check of one idea, not part of the library.

Each ReLU of the chosen sites is replaced by its ``T``-level quantisation at per-channel
thresholds chosen by squared error (512 training images, the ANN's own inputs at each site),
with or without a fixed dither pattern ``d`` (per channel and position, tiled over the image):
``theta/T * clip(floor((x + d theta/T) T/theta + 1/2), 0, T)``, minus ``d theta/T`` afterwards for
the subtractive variants (a per-position bias the next layer could absorb). The rest of the
network stays the ANN; test accuracy on 2,000 CIFAR-10 test images. Run from the repository
root with ``SJPC_CIFAR10_DIR`` set::

    PYTHONPATH=tests python benchmarks/first_layer_dither.py resnet32 --T 4
"""
import argparse, copy, math, os, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch
import torch.nn as nn

import pretrained_resnets as P
from sj_parallel_conversion import load_user_model
from sj_parallel_conversion.tools import data

ap = argparse.ArgumentParser()
ap.add_argument("net", choices=sorted(P.FILES))
ap.add_argument("--T", type=int, default=4)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
folder = os.environ.get(P.ENV_VAR, os.path.join(ROOT, "..", "shared", "data", "pretrained_cifar10_resnets"))
norm = dict(mean=list(P.MEAN), std=list(P.STD))
calib = data.cifar10_npz("train", limit=512, **norm).tensors[0]
tx, ty = data.cifar10_npz("test", limit=2000, **norm).tensors
ann = load_user_model(f"pretrained_resnets:{a.net}", os.path.join(folder, P.FILES[a.net][0])).eval()
T = a.T
BAYER = (torch.tensor([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]], dtype=torch.float32) + 0.5) / 16 - 0.5


class Quantised(nn.Module):
    def __init__(self, theta, pattern, subtract):
        super().__init__()
        self.theta, self.pattern, self.subtract = theta, pattern, subtract

    def forward(self, x):
        th = self.theta.view(1, -1, 1, 1)
        h, w = x.shape[-2:]
        p = self.pattern.shape[-1]
        d = self.pattern.repeat(1, math.ceil(h / p), math.ceil(w / p))[:, :h, :w].unsqueeze(0) * th / T
        out = th / T * torch.floor((x + d) * T / th + 0.5).clamp(0, T)
        return out - d if self.subtract else out


def pattern(kind, c):
    if kind == "bayer":
        return BAYER.expand(c, 4, 4).clone()
    if kind == "random":
        return torch.rand(c, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5
    return torch.zeros(c, 1, 1)


sites = [n for n, m in ann.named_modules() if isinstance(m, nn.ReLU)]
inputs = {}


def keep(name):
    def hook(module, args, out):
        inputs[name] = args[0].detach()  # returns None: the module's output stays as it is
    return hook


hooks = [ann.get_submodule(n).register_forward_hook(keep(n)) for n in sites]
with torch.no_grad():
    ann(calib)
for h in hooks:
    h.remove()


def mse_theta(x):
    x = x.transpose(0, 1).reshape(x.shape[1], -1)
    top = x.max(1).values.clamp(min=1e-6)
    best = torch.full_like(top, float("inf"))
    chosen = top.clone()
    for f in torch.arange(1, 65) / 64:
        th = top * f
        err = (th[:, None] / T * torch.floor(x * T / th[:, None] + 0.5).clamp(0, T) - x.clamp(min=0)).pow(2).mean(1)
        better = err < best
        best, chosen = torch.where(better, err, best), torch.where(better, th, chosen)
    return chosen


thetas = {n: mse_theta(inputs[n]) for n in sites}


def accuracy(model):
    with torch.no_grad():
        return 100 * sum(int((model(tx[i:i + 500]).argmax(1) == ty[i:i + 500]).sum()) for i in range(0, 2000, 500)) / 2000


def quantised(names, kind, subtract):
    m = copy.deepcopy(ann)
    for n in names:
        parent, _, child = n.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, child,
                Quantised(thetas[n], pattern(kind, thetas[n].numel()), subtract))
    return m


print(f"{a.net}, T={T}: ANN {accuracy(ann):.2f} %")
first_stage = [s for s in sites if s == "relu" or s.startswith("layer1.")]
for label, names in (("first activation", sites[:1]), ("first stage", first_stage)):
    for kind, subtract in (("none", False), ("bayer", False), ("bayer", True), ("random", True)):
        name = "no dither" if kind == "none" else f"{kind} dither{', subtracted' if subtract else ''}"
        print(f"  {label:16s} {name:26s} {accuracy(quantised(names, kind, subtract)):.2f} %", flush=True)
