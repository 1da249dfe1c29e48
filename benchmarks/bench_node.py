"""Neuron-level speed: ParallelConversionNode vs SpikingJelly's multi-step IFNode on one tensor.

Both neurons get the same current tensor ``[T, N, C, H, W]`` and emit ``T`` steps. Runs are
interleaved (``pc_torch, [pc_native,] [pc_cupy,] if, ...``) after a warm-up, under ``torch.no_grad()``;
``functional.reset_net`` is called before every IF run (and is not timed). The table reports
median seconds per call and the median over repetitions of the per-pair ratio
``IF time / node time``.

Acceptance run (CPU)::

    python benchmarks/bench_node.py                      # shape [32, 64, 64, 16, 16], T = 32
    python benchmarks/bench_node.py --sweep --repeats 5  # T = 4, 8, 16, 32, 64 (T_in = T)
    python benchmarks/bench_node.py --json benchmarks/results/bench_node.json
    python benchmarks/bench_node.py --repeats 9 --threads 2 --ceiling  # + the copy bound
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from spikingjelly.activation_based import functional, neuron  # noqa: E402
from tabulate import tabulate  # noqa: E402

from sj_parallel_conversion import ParallelConversionNode  # noqa: E402
from sj_parallel_conversion.fileio import write_json  # noqa: E402
from sj_parallel_conversion.kernels import cupy_backend, native_backend  # noqa: E402
from sj_parallel_conversion.timing import timed  # noqa: E402

SWEEP_T = (4, 8, 16, 32, 64)


def bench(shape, T: int, repeats: int, device: torch.device, dtype: torch.dtype, ceiling: bool = False) -> dict:
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=dtype) * 0.5 + 0.3).to(device)
    if_node = neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode="m").to(device)
    nodes = {"pc_torch": ParallelConversionNode(T, v_threshold=1.0, backend="torch").to(device)}
    if device.type == "cpu" and dtype in native_backend.DTYPES:
        if native_backend.availability() is not None:
            raise SystemExit(f"the native CPU kernel cannot be built: {native_backend.availability()}")
        nodes["pc_native"] = ParallelConversionNode(T, v_threshold=1.0, backend="native").to(device)
    if device.type == "cuda" and cupy_backend.availability() is None:
        nodes["pc_cupy"] = ParallelConversionNode(T, v_threshold=1.0, backend="cupy").to(device)

    def run_if():
        return if_node(x)

    fns = {name: (lambda n=n: n(x)) for name, n in nodes.items()}
    fns["if"] = run_if
    if ceiling:
        # Reading the input once and writing a freshly allocated output of the same size: what any
        # node that maps [T, ...] currents to [T, ...] spikes must at least do.
        fns["copy"] = lambda: torch.empty_like(x).copy_(x)
    times = {name: [] for name in fns}
    rates = {}
    with torch.no_grad():
        for name, fn in fns.items():  # warm-up (also builds the native or cupy kernel)
            if name == "if":
                functional.reset_net(if_node)
            out = fn()
            if name != "copy":
                rates[name] = float((out != 0).float().mean())  # fraction of steps with a spike
            del out
        for _ in range(repeats):
            for name, fn in fns.items():
                if name == "if":
                    functional.reset_net(if_node)
                times[name].append(timed(fn, device))
    res = {
        "shape": list(shape), "T": T, "T_in": shape[0], "repeats": repeats, "dtype": str(dtype),
        "device": str(device), "median_s": {k: statistics.median(v) for k, v in times.items()},
        "times_s": times, "spike_fraction": rates, "ratio_if_over": {},
    }
    for name in list(nodes) + (["copy"] if ceiling else []):
        ratios = [a / b for a, b in zip(times["if"], times[name])]
        res["ratio_if_over"][name] = statistics.median(ratios)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs="+", default=[32, 64, 64, 16, 16],
                   help="input shape [T_in, N, ...] (default 32 64 64 16 16)")
    p.add_argument("--T", type=int, default=None, help="output time steps (default: shape[0])")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per method (default 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--sweep", action="store_true",
                   help=f"sweep T over {SWEEP_T} with shape [T, *shape[1:]] (T_in = T)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--ceiling", action="store_true",
                   help="also time a copy of the input into a new tensor (read once, write once), the "
                        "memory-traffic floor of any node, and print IF / copy: the largest ratio possible")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    configs = ([(tuple([t] + args.shape[1:]), t) for t in SWEEP_T] if args.sweep
               else [(tuple(args.shape), args.T or args.shape[0])])
    results = [bench(shape, T, args.repeats, device, dtype, args.ceiling) for shape, T in configs]

    backends = [n for n in ("pc_torch", "pc_native", "pc_cupy") if n in results[0]["median_s"]]
    rows = []
    for r in results:
        row = [r["T"], "x".join(map(str, r["shape"])), f"{r['median_s']['if'] * 1e3:.1f}"]
        for name in backends:
            row += [f"{r['median_s'][name] * 1e3:.2f}", f"{r['ratio_if_over'][name]:.2f}x"]
        if args.ceiling:
            row += [f"{r['median_s']['copy'] * 1e3:.2f}", f"{r['ratio_if_over']['copy']:.2f}x"]
        rows.append(row)
    headers = ["T", "shape", "IF ms"]
    for name in backends:
        b = name[3:]
        headers += [f"PC({b}) ms", f"IF/PC({b})"]
    if args.ceiling:
        headers += ["copy ms", "IF/copy (ceiling)"]
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"torch={torch.__version__}")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print("IF/PC: median over repetitions of the per-pair ratio (IF time / node time); ms: medians.")
    if args.json:
        meta = {"platform": platform.platform(), "python": platform.python_version(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, {"meta": meta, "results": results})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
