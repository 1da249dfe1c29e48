"""Native kernel before and after a change, in one process: the fire and count entry points of the
library built from the kernel source at a git revision against the one built from the working
tree, called on the same tensors in alternating rounds (each goes first in half of them), with
the same thread count. Prints the medians and the median of the per-round ratios after/before.

Both libraries get identical arguments and must write identical bits (checked first). Only the
kernels are timed, not the Python around them, so a busy machine moves both alike.

    python benchmarks/bench_kernel_ab.py --before 65f5751^ --threads 2
    python benchmarks/bench_kernel_ab.py --before 65f5751^ --threads 1 --rounds 24
"""
from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sj_parallel_conversion.kernels import native_backend, sources  # noqa: E402

_P, _I64, _I32, _BUF = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_char_p


def source_at(rev: str) -> tuple:
    """``(text, with_status)``: the kernel source at ``rev``, from ``kernels/csrc`` or, before it
    existed, from the string in ``native_backend.py``; ``with_status`` says whether its entry
    points take the message buffer (the csrc form)."""
    def show(path: str):
        res = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        return res.stdout if res.returncode == 0 else None

    text = show(f"sj_parallel_conversion/kernels/csrc/{native_backend.SOURCE}")
    if text is not None:
        return text, True
    module = show("sj_parallel_conversion/kernels/native_backend.py")
    if module is None:
        raise SystemExit(f"no native kernel source at {rev}")
    return re.search(r'_SOURCE = r"""\n(.*?)"""', module, re.S).group(1), False


def library(name: str, text: str, with_status: bool):
    lib = ctypes.CDLL(str(native_backend.build_library(name, {"fire.cpp": text}, "fire.cpp", native_backend.FLAGS)))
    tail = [_BUF, _I64] if with_status else []
    lib.sjpc_native_fire_f32.argtypes = [_P] * 6 + [_I64, _I32, _I32, _I64, _I64, _I32, _I32] + tail
    lib.sjpc_native_count_f32.argtypes = [_P] * 6 + [_I64, _I32, _I64, _I64, _I32] + tail
    return lib, (ctypes.create_string_buffer(512), 512) if with_status else ()


def cases(threads: int):
    """(name, calls per timing, tensors to keep alive, fire or count, arguments)."""
    g = torch.Generator().manual_seed(0)
    scalars = [torch.tensor([v]) for v in (1.0, 0.5, 0.0, 1.0)]
    for shape, reps in (((32, 64, 64, 16, 16), 3), ((4, 32, 16, 8, 8), 300)):
        x = torch.randn(shape, generator=g) * 0.5 + 0.3
        out = torch.empty_like(x)
        M = x[0].numel()
        args = (x.data_ptr(), out.data_ptr(), *[p.data_ptr() for p in scalars], M, shape[0], shape[0], M, 1, 1,
                threads)
        yield f"fire {list(shape)} T={shape[0]}", reps, (x, out, scalars), "fire", args, out
    m = torch.randn(256, 16, 32, 32, generator=g)  # a ResNet-20 stage-1 activation at batch 256
    out = torch.empty_like(m)
    per_channel = [torch.rand(16, generator=g) + 0.5, torch.full((16,), 0.3), torch.zeros(16), torch.full((16,), 0.05)]
    args = (m.data_ptr(), out.data_ptr(), *[p.data_ptr() for p in per_channel], m.numel(), 32, 1024, 16, threads)
    yield "count [256, 16, 32, 32] T=32", 10, (m, out, per_channel), "count", args, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision whose kernel source is the baseline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=24)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    old, old_tail = library("sjpc_kernel_before", *source_at(args.before))
    new, new_tail = library("sjpc_kernel_after", sources.read(native_backend.SOURCE), True)
    print(f"threads={args.threads} rounds={args.rounds} before={args.before} torch={torch.__version__}")
    for name, reps, _keep, kind, call_args, out in cases(args.threads):
        f_old = getattr(old, f"sjpc_native_{kind}_f32")
        f_new = getattr(new, f"sjpc_native_{kind}_f32")
        f_old(*call_args, *old_tail)
        want = out.clone()
        f_new(*call_args, *new_tail)
        if not torch.equal(want.view(torch.int32), out.view(torch.int32)):
            raise SystemExit(f"{name}: the two kernels write different bits")
        times = {"before": [], "after": []}
        pair = (("before", f_old, old_tail), ("after", f_new, new_tail))
        for r in range(args.rounds):
            for label, fn, tail in (pair if r % 2 == 0 else pair[::-1]):
                t = time.perf_counter()
                for _ in range(reps):
                    fn(*call_args, *tail)
                times[label].append((time.perf_counter() - t) / reps)
        ratio = statistics.median(a / b for b, a in zip(times["before"], times["after"]))
        print(f"{name}: before {statistics.median(times['before']) * 1e3:.3f} ms, "
              f"after {statistics.median(times['after']) * 1e3:.3f} ms, after/before {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
