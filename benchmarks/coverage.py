"""Which torchvision families convert? Parallel conversion beside SpikingJelly's RateCodingRecipe.

Every family is built with random weights (``weights=None``, eval mode) and converted twice on a
few random calibration images: with :class:`~sj_parallel_conversion.ParallelConverter` (T=4,
Algorithm 1) and with SpikingJelly's ``RateCodingRecipe`` (max thresholds, IF neurons). A family
"converts" when the conversion succeeds *and* the converted network runs at spike level; for the
parallel conversion the spike-level output must also equal the count domain (the property that
makes the conversion exact). Otherwise the table gives the first line of the error, which for the
parallel conversion names every unsupported kind of operation and where it sits.

    python benchmarks/coverage.py --out docs/results/coverage.md
    python benchmarks/coverage.py --families resnet18 vit_b_16      # print rows only
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import re
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sj_parallel_conversion import ParallelConverter, count_inference, spike_inference  # noqa: E402

# family -> (constructor options besides weights=None, input side length). 64 px keeps the
# convolutional families fast; ViT needs its own 224 and Inception v3 at least 75.
FAMILIES: Dict[str, tuple] = {
    "resnet18": ({}, 64),
    "vgg11_bn": ({}, 64),
    "alexnet": ({}, 64),
    "densenet121": ({}, 64),
    "mobilenet_v2": ({}, 64),
    "mobilenet_v3_small": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "regnet_x_400mf": ({}, 64),
    "squeezenet1_1": ({}, 64),
    "googlenet": ({"aux_logits": False, "init_weights": False}, 64),
    "shufflenet_v2_x0_5": ({}, 64),
    "mnasnet0_5": ({}, 64),
    "resnext50_32x4d": ({}, 64),
    "wide_resnet50_2": ({}, 64),
    "convnext_tiny": ({}, 64),
    "vit_b_16": ({}, 224),
    "swin_t": ({}, 64),
    "inception_v3": ({"aux_logits": False, "init_weights": False}, 80),
}

T = 4
REASON_CHARS = 200


def build(family: str) -> torch.nn.Module:
    """The torchvision model ``family`` with random weights, in eval mode (seeded)."""
    import torchvision

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    return getattr(torchvision.models, family)(weights=None, **FAMILIES[family][0]).eval()


def _images(family: str, n: int = 2) -> torch.Tensor:
    side = FAMILIES[family][1]
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


def _reason(exc: BaseException) -> str:
    problems = getattr(exc, "problems", ())
    if problems:
        # GraphConversionError: every unsupported kind with its count, the table's "why".
        counts: Dict[str, int] = {}
        for p in problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return "unsupported: " + ", ".join(f"{kind} x{n}" for kind, n in counts.items())
    line = (str(exc).strip().splitlines() or [""])[0]
    line = re.sub(r" at 0x[0-9a-f]+", "", f"{type(exc).__name__}: {line}")  # addresses change per run
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS - 3] + "..."


def unsupported_kinds(exc: BaseException) -> List[str]:
    """The kinds of operation a :class:`GraphConversionError` lists, in order of appearance."""
    return list(dict.fromkeys(p.kind for p in getattr(exc, "problems", ())))


def try_parallel(family: str) -> Tuple[Optional[str], List[str]]:
    """``(None, [])`` if ``family`` converts with the parallel recipe and is exact in the count domain,
    else ``(why not, unsupported kinds of operation)``."""
    x = _images(family)
    try:
        snn = ParallelConverter("parallel", T=T, dataloader=[x], method="ema", progress=False).convert(build(family))
        # Compared in float64: in float32 a current within rounding distance of a firing boundary
        # can flip one spike in a deep network (see the docs' exactness section), which says
        # nothing about whether the family converts.
        snn, x = snn.double(), x.double()
        spikes = spike_inference(snn, x).mean(0)
        counts = count_inference(snn, x)
    except Exception as exc:  # the table records every failure, whatever its kind
        return _reason(exc), unsupported_kinds(exc)
    if not torch.allclose(spikes, counts, rtol=1e-7, atol=1e-9):
        return f"spike level differs from the count domain by {float((spikes - counts).abs().max()):.3g}", []
    return None, []


def try_rate_coding(family: str) -> Optional[str]:
    """None if SpikingJelly's ``RateCodingRecipe`` converts ``family`` and the SNN runs T steps, else why not."""
    from spikingjelly.activation_based import ann2snn, functional

    x = _images(family)
    try:
        # SpikingJelly's recipe draws a progress bar with no switch to turn it off.
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            snn = ann2snn.Converter(ann2snn.RateCodingRecipe([x], mode="max")).convert(build(family))
        functional.set_step_mode(snn, "m")
        functional.reset_net(snn)
        with torch.no_grad():
            snn(x.unsqueeze(0).repeat(T, *([1] * x.dim())))
        functional.reset_net(snn)
    except Exception as exc:
        return _reason(exc)
    return None


def coverage_row(family: str, rate_coding: bool = True) -> dict:
    """One table row: ``{"family", "parallel", "parallel_reason", "parallel_kinds", "rate", "rate_reason",
    "seconds"}``."""
    start = time.perf_counter()
    why, kinds = try_parallel(family)
    row = {"family": family, "parallel": why is None, "parallel_reason": why or "", "parallel_kinds": kinds}
    if rate_coding:
        why = try_rate_coding(family)
        row.update(rate=why is None, rate_reason=why or "")
    row["seconds"] = time.perf_counter() - start
    return row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: List[dict]) -> str:
    n_par = sum(r["parallel"] for r in rows)
    n_rate = sum(r["rate"] for r in rows)
    lines = [
        f"Parallel conversion converts {n_par} of {len(rows)} torchvision families; "
        f"SpikingJelly's RateCodingRecipe converts {n_rate}.",
        "",
        "| family | parallel | why not (parallel) | RateCodingRecipe | why not (RateCodingRecipe) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['family']} | {'yes' if r['parallel'] else 'no'} | {_cell(r['parallel_reason'])} | "
                     f"{'yes' if r['rate'] else 'no'} | {_cell(r['rate_reason'])} |")
    import torchvision

    lines += [
        "",
        f"Random weights, eval mode, T={T}, two random calibration images per family (64x64 px; "
        "vit_b_16 224, inception_v3 80). Parallel: ParallelConverter with Algorithm 1; yes = converts "
        "and the spike-level output equals the count domain. RateCodingRecipe: mode='max'; yes = "
        "converts and runs T steps.",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, spikingjelly "
        f"{importlib.metadata.version('spikingjelly')}, Python {platform.python_version()}. "
        "Generated by benchmarks/coverage.py.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--out", default=None, help="write the Markdown table here (default: print rows only)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is not None:
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            p.error(f"--out: folder {parent} does not exist")
    rows = []
    for family in args.families:
        row = coverage_row(family)
        rows.append(row)
        print(f"{family:22s} parallel={'yes' if row['parallel'] else 'no '} rate={'yes' if row['rate'] else 'no '} "
              f"({row['seconds']:.1f} s) {row['parallel_reason'][:100]}", flush=True)
    if args.out is not None:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(to_markdown(rows))
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
