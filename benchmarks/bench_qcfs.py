"""QCFS ANN without gradients: the straight-through form against the plain count it now computes.

``QCFS`` evaluates its straight-through floor only where autograd records the call; under
``torch.no_grad`` it computes the neuron's own count (same values). This times, on the shipped
QCFS CNN, the network's forward both ways in interleaved rounds after a warm-up (the
straight-through form forced by patching the module's method for its rounds) and prints the
median of the per-round ratios ``straight-through / plain``, after checking that both give the
same logits.

    python benchmarks/bench_qcfs.py --images 1000 --repeats 7 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sj_parallel_conversion import QCFS, formulas  # noqa: E402
from sj_parallel_conversion.timing import timed  # noqa: E402
from sj_parallel_conversion.tools import data, models  # noqa: E402

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "sj_parallel_conversion", "tools", "checkpoints",
                          "cifar10_cnn_qcfs_L4.pt")


def straight_through(self, x):
    th = formulas.channel_view(self.theta, x.dim(), self.channel_dim)
    return formulas.qcfs(x, th, self.L, self.shift * th, ste=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ann, _ = models.load_checkpoint(CHECKPOINT)
    ann.eval()
    x = data.cifar10_subset("test", limit=args.images).tensors[0]
    plain_activate = QCFS.activate

    def run(activate):
        QCFS.activate = activate
        try:
            with torch.no_grad():
                return ann(x)
        finally:
            QCFS.activate = plain_activate

    assert torch.equal(run(plain_activate), run(straight_through)), "the two forms differ"
    ratios, times = [], {"straight-through": [], "plain": []}
    for _ in range(args.repeats):
        ste = timed(lambda: run(straight_through))
        plain = timed(lambda: run(plain_activate))
        times["straight-through"].append(ste)
        times["plain"].append(plain)
        ratios.append(ste / plain)
    print(f"QCFS CNN, {args.images} images, {args.threads} threads, {args.repeats} interleaved rounds: "
          f"median straight-through {statistics.median(times['straight-through']):.3f} s, "
          f"plain {statistics.median(times['plain']):.3f} s; "
          f"median ratio straight-through / plain {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
