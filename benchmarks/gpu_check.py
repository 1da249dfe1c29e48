"""The first GPU run in one command: every check and figure of the CUDA path, in one folder.

Stages, each recorded in ``gpu_check.json`` and summarised in ``gpu_check.md`` under ``--out``:

1. ``env``: versions, the GPU, the commit;
2. ``tests``: the CUDA-marked tests (``pytest -m cuda tests``);
3. ``bitwise``: the cupy kernel against the torch backend, bit for bit, over dtypes (float32,
   float64, float16, bfloat16), layouts (contiguous, channels-last steps, sliced), ``T_in != T``,
   scalar and per-channel parameters and both spike orders;
4. ``node``: :class:`~sj_parallel_conversion.ParallelConversionNode` (cupy and torch backends)
   against SpikingJelly's multi-step ``IFNode`` with its CUDA implementations (SpikingJelly 2.0
   picks one per process from ``SJ_IF_CUDA_IMPLEMENTATION``: ``cuda``, the prebuilt native
   kernels, or ``triton``; each is timed in its own process and the fastest is the reference),
   with the effective memory bandwidth of each;
5. ``network``: the shipped CIFAR-10 ResNet-20 at spike level and in the count domain against
   SpikingJelly's IF-SNN (``ann2snn.Converter`` with ``RateCodingRecipe``), at T = 4, 8, 16, 32
   and batch 1 and 256, with the ratios.

Usage (from the repository root; ``bash tools/gpu_check.sh`` creates the environment first)::

    python benchmarks/gpu_check.py --out runs/gpu_check
    python benchmarks/gpu_check.py --cpu-dry-run --out runs/gpu_check_dry   # every stage, tiny, on CPU

``--cpu-dry-run`` runs the same stages on tiny sizes on the CPU, comparing the native kernel with
the torch backend where the cupy kernel cannot run (the skip and its reason are recorded), so the
script is exercised without a GPU. The exit status is 0 when every check passed (tests, bitwise
comparison, every stage ran) and 1 otherwise; timings never fail a run. The output format is
documented in ``docs/benchmarks.rst`` ("GPU check").
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from sj_parallel_conversion import kernels  # noqa: E402
from sj_parallel_conversion.fileio import write_json, write_text  # noqa: E402
from sj_parallel_conversion.kernels import cupy_backend, native_backend  # noqa: E402
from sj_parallel_conversion.timing import timed  # noqa: E402

SCHEMA = 1
CHECKPOINT = os.path.join(ROOT, "sj_parallel_conversion", "tools", "checkpoints", "cifar10_resnet20_relu.pt")
#: SpikingJelly's IFNode CUDA implementations, chosen per process by this environment variable.
IF_VARIABLE = "SJ_IF_CUDA_IMPLEMENTATION"
IF_IMPLEMENTATIONS = ("cuda", "triton")
IF_METHOD = "rate-max"  # compare.BUILTIN: RateCodingRecipe(mode="max"), as bench_network.py uses
LAYOUTS = ("contiguous", "channels_last", "sliced")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    node_T: tuple
    node_step: tuple            # one step [N, C, H, W] of the node's input
    node_dtypes: tuple
    node_repeats: int
    bit_dtypes: tuple
    bit_step: tuple
    bit_T: tuple                # (T_in, T) pairs
    net_T: tuple
    net_batches: tuple
    net_repeats: int
    calib_images: int


GPU = Sizes(node_T=(4, 8, 16, 32), node_step=(128, 128, 16, 16), node_dtypes=("float32", "float16"),
            node_repeats=20, bit_dtypes=("float32", "float64", "float16", "bfloat16"), bit_step=(8, 32, 16, 16),
            bit_T=((1, 1), (4, 4), (3, 8), (16, 5), (32, 32)), net_T=(4, 8, 16, 32), net_batches=(1, 256),
            net_repeats=5, calib_images=256)
DRY = Sizes(node_T=(4,), node_step=(2, 8, 4, 4), node_dtypes=("float32", "float16"), node_repeats=2,
            bit_dtypes=("float32", "float64", "float16", "bfloat16"), bit_step=(2, 6, 3, 5),
            bit_T=((1, 1), (3, 8)), net_T=(2, 4), net_batches=(1, 4), net_repeats=1, calib_images=16)


# -- stage 1: environment -----------------------------------------------------------------------
def _version(dist_name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_env(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=30).stdout.strip() or None
    except OSError:
        commit = None
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cupy": _version("cupy-cuda13x") or _version("cupy"),
           "spikingjelly": _version("spikingjelly"), "triton": _version("triton"), "commit": commit,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "device": str(device), "gpu": None, "capability": None,
           "cupy_availability": cupy_backend.availability() or "ok"}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    return env


# -- stage 2: the CUDA-marked tests ------------------------------------------------------------------
def run_tests(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return {"status": "passed" if res.returncode == 0 else "failed", "returncode": res.returncode,
            "command": " ".join(["python"] + cmd[1:]), "summary": lines[-1] if lines else "",
            "tail": "" if res.returncode == 0 else (res.stdout[-4000:] + res.stderr[-2000:])}


# -- stage 3: bit for bit -----------------------------------------------------------------------------
_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def differing_values(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (``-0.0`` and ``0.0`` count as different)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.numel(), b.numel())
    ints = _INT[a.element_size()]
    return int((a.view(ints) != b.view(ints)).sum())


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` ``[T_in, N, C, H, W]`` with the same values in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":  # every step channels-last, steps dense one after another
        return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    if layout == "sliced":  # every other element of a tensor twice as wide: no step is dense
        return torch.stack([x, x], dim=-1).flatten(-2)[..., ::2]
    raise ValueError(f"unknown layout {layout!r}")


def _bit_inputs(T_in: int, step: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn((T_in,) + step, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    flat = x.view(T_in, -1)
    tiny = torch.finfo(dtype).tiny
    # subnormal, infinite and NaN currents, alone and (inf, -inf) cancelling to a NaN mean
    flat[0, :4] = torch.tensor([tiny / 4, -tiny / 8, float("inf"), float("nan")], dtype=torch.float64)
    flat[:, 4] = float("-inf")
    if T_in > 1:
        flat[0, 5], flat[1, 5] = float("inf"), float("-inf")
    return x.to(dtype)


def _bit_params(C: Optional[int], gen: torch.Generator) -> tuple:
    if C is None:
        return tuple(torch.tensor(v) for v in (0.9, 0.4, -0.05, 1.1))
    r = lambda lo, hi: torch.rand(C, generator=gen) * (hi - lo) + lo  # noqa: E731
    return r(0.3, 2.0), r(0.0, 1.0), r(-0.3, 0.3), r(0.3, 2.0)


def bitwise(sizes: Sizes, device: torch.device, dry_run: bool) -> dict:
    """The fused kernel of ``device`` against the torch backend, every case bit for bit."""
    skipped: List[dict] = []
    if device.type == "cuda":
        reason = cupy_backend.availability()
        if reason is not None:
            return {"status": "failed", "backend": "cupy", "reference": "torch", "cases": [], "mismatched_cases": 0,
                    "skipped": [{"what": "cupy vs torch", "reason": reason}]}
        backend = "cupy"
    else:
        backend = "native"
        skipped.append({"what": "cupy vs torch", "reason": "no CUDA device (--cpu-dry-run): the native CPU kernel "
                        "stands in for the cupy kernel"})
        if native_backend.availability() is not None:
            skipped.append({"what": "native vs torch", "reason": native_backend.availability()})
            return {"status": "skipped", "backend": backend, "reference": "torch", "cases": [],
                    "mismatched_cases": 0, "skipped": skipped}
    cases = []
    gen = torch.Generator().manual_seed(24)
    for name in sizes.bit_dtypes:
        dtype = getattr(torch, name)
        if backend == "native" and dtype not in native_backend.DTYPES:
            skipped.append({"what": f"native vs torch, {name}", "reason": "the native kernel takes float32/float64 "
                            "only (half precision runs on the torch backend on CPU)"})
            continue
        for (T_in, T), layout, per_channel, order in (
                (t, lay, pc, o) for t in sizes.bit_T for lay in LAYOUTS for pc in (False, True)
                for o in ("late", "early")):
            params = [p.to(device) for p in _bit_params(sizes.bit_step[1] if per_channel else None, gen)]
            x = with_layout(_bit_inputs(T_in, sizes.bit_step, dtype, gen).to(device), layout)
            got = kernels.fire(x, T, *params, channel_dim=1, order=order, backend=backend)
            want = kernels.fire(x, T, *params, channel_dim=1, order=order, backend="torch")
            cases.append({"dtype": name, "layout": layout, "T_in": T_in, "T": T,
                          "params": "per-channel" if per_channel else "scalar", "order": order,
                          "neurons": x[0].numel(), "differing_values": differing_values(got, want),
                          "same_strides": got.stride() == want.stride()})
    bad = sum(1 for c in cases if c["differing_values"] or not c["same_strides"])
    return {"status": "passed" if bad == 0 and cases else "failed", "backend": backend, "reference": "torch",
            "cases": cases, "mismatched_cases": bad, "skipped": skipped}


# -- stage 4: the node against IFNode (one process per IF implementation) ------------------------------
def node_worker(sizes: Sizes, device: torch.device) -> dict:
    """Time the node and IFNode in this process (its IF implementation comes from the environment)."""
    spec = importlib.util.spec_from_file_location("bench_node", os.path.join(ROOT, "benchmarks", "bench_node.py"))
    bench_node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_node)
    bench = bench_node.bench

    runs = []
    for name in sizes.node_dtypes:
        dtype = getattr(torch, name)
        for T in sizes.node_T:
            shape = (T,) + tuple(sizes.node_step)
            r = bench(shape, T, sizes.node_repeats, device, dtype, ceiling=True)
            neurons = torch.Size(shape[1:]).numel()
            moved = (shape[0] + T) * neurons * torch.empty((), dtype=dtype).element_size()  # read once, write once
            runs.append({"dtype": name, "T": T, "T_in": shape[0], "shape": list(shape), "bytes_moved": moved,
                         "median_ms": {k: 1e3 * v for k, v in r["median_s"].items()},
                         "ratio_if_over": r["ratio_if_over"],
                         "effective_GBps": {k: moved / v / 1e9 for k, v in r["median_s"].items()},
                         "spike_fraction": r["spike_fraction"]})
    return {"runs": runs}


def _worker(kind: str, sizes_name: str, device: str, env: Dict[str, str], timeout: int) -> dict:
    """Run ``--worker kind`` in a fresh process with ``env`` added; its JSON result or the error."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--sizes", sizes_name,
               "--device", device, "--worker-out", out]
        res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0 or not os.path.exists(out):
            lines = [line for line in (res.stderr or res.stdout).splitlines() if line.strip()]
            return {"error": lines[-1] if lines else f"exit status {res.returncode}",
                    "tail": res.stderr[-3000:]}
        with open(out) as f:
            return json.load(f)


def node_stage(sizes: Sizes, sizes_name: str, device: torch.device, timeout: int) -> dict:
    impls = IF_IMPLEMENTATIONS if device.type == "cuda" else ("cpu",)
    results = {}
    for impl in impls:
        env = {IF_VARIABLE: impl} if device.type == "cuda" else {}
        results[impl] = _worker("node", sizes_name, str(device), env, timeout)
    ok = {k: v for k, v in results.items() if "error" not in v}
    if not ok and device.type == "cuda":  # neither: SpikingJelly's torch reference, so a figure exists
        results["torch"] = _worker("node", sizes_name, str(device), {IF_VARIABLE: "torch"}, timeout)
        ok = {k: v for k, v in results.items() if "error" not in v}
    if not ok:
        return {"status": "failed", "if_implementations": {k: v.get("error") for k, v in results.items()}, "runs": []}
    # The reference: the implementation with the smallest total IF time over all configurations.
    fastest = min(ok, key=lambda k: sum(r["median_ms"]["if"] for r in ok[k]["runs"]))
    return {"status": "passed", "if_implementation": fastest,
            "if_implementations": {k: ("ok" if k in ok else v["error"]) for k, v in results.items()},
            "if_total_ms": {k: sum(r["median_ms"]["if"] for r in v["runs"]) for k, v in ok.items()},
            "runs": ok[fastest]["runs"]}


# -- stage 5: ResNet-20 against the IF-SNN ----------------------------------------------------------
def network_worker(sizes: Sizes, device: torch.device) -> dict:
    """The shipped ResNet-20: spike level, count domain, ANN and SpikingJelly's IF-SNN, timed in
    interleaved rounds per (T, batch)."""
    from spikingjelly.activation_based import functional
    from torch.utils.data import DataLoader

    from sj_parallel_conversion import ParallelConverter, count_domain_model
    from sj_parallel_conversion.tools import data, models
    from sj_parallel_conversion.tools.compare import BUILTIN, convert_builtin
    from sj_parallel_conversion.inference import repeat_input, spike_inference

    ann, meta = models.load_checkpoint(CHECKPOINT, map_location="cpu")
    ann = ann.to(device).eval()
    calib = DataLoader(data.cifar10_subset("train", limit=sizes.calib_images), batch_size=128)
    x_all, y_all = data.cifar10_subset("test", limit=max(max(sizes.net_batches), 10)).tensors
    x_all, y_all = x_all.to(device), y_all.to(device)
    snn_if = convert_builtin(IF_METHOD, ann, calib, device=device, progress=False)
    runs = []
    for T in sizes.net_T:
        t0 = time.perf_counter()
        snn = ParallelConverter("parallel", T=T, dataloader=calib, progress=False, method="ema",
                                device=device).convert(copy.deepcopy(ann)).eval()
        counted = count_domain_model(snn)
        convert_s = time.perf_counter() - t0
        for batch in sizes.net_batches:
            x, y = x_all[:batch], y_all[:batch]
            x_if = repeat_input(x, T)
            outs = {}

            def run_if():
                functional.reset_net(snn_if)
                outs["if"] = snn_if(x_if).mean(0)

            fns = {"ann": lambda: outs.__setitem__("ann", ann(x)),
                   "count": lambda: outs.__setitem__("count", counted(x)),
                   "spike": lambda: outs.__setitem__("spike", spike_inference(snn, x).mean(0)),
                   "if": run_if}
            times = {k: [] for k in fns}
            with torch.no_grad():
                for fn in fns.values():  # warm-up
                    fn()
                for _ in range(sizes.net_repeats):
                    for k, fn in fns.items():
                        times[k].append(timed(fn, device))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = lambda a, b: statistics.median(p / q for p, q in zip(times[a], times[b]))  # noqa: E731
            run = {"T": T, "batch": batch, "median_ms": {k: 1e3 * v for k, v in med.items()},
                   "images_per_s": {k: batch / v for k, v in med.items()},
                   "ratios": {"if/spike": ratio("if", "spike"), "if/count": ratio("if", "count"),
                              "spike/ann": ratio("spike", "ann"), "count/ann": ratio("count", "ann")},
                   "count_vs_spike_max_abs": float((outs["count"] - outs["spike"]).abs().max()),
                   "convert_s": convert_s}
            if batch > 1:
                run["top1_on_batch"] = {k: float((v.argmax(-1) == y).float().mean()) for k, v in outs.items()}
            runs.append(run)
    return {"model": "resnet20 (shipped ReLU checkpoint)", "checkpoint": os.path.relpath(CHECKPOINT, ROOT),
            "ann_test_accuracy": meta.get("test_accuracy"), "if_method": IF_METHOD,
            "if_recipe": f"ann2snn.RateCodingRecipe({', '.join(f'{k}={v!r}' for k, v in BUILTIN[IF_METHOD].items())})",
            "parallel_recipe": "ParallelConverter('parallel', method='ema')",
            "calibration_images": sizes.calib_images, "runs": runs}


def network_stage(sizes_name: str, device: torch.device, if_impl: Optional[str], timeout: int) -> dict:
    env = {IF_VARIABLE: if_impl} if device.type == "cuda" and if_impl else {}
    res = _worker("network", sizes_name, str(device), env, timeout)
    if "error" in res:
        return {"status": "failed", **res, "runs": []}
    return {"status": "passed", "if_implementation": if_impl or "cpu", **res}


# -- report ---------------------------------------------------------------------------------------
def _f(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    env, st = report["env"], report["stages"]
    title = env["gpu"] or f"CPU dry run ({env['cpu']}, {env['threads']} threads)"
    lines = [f"# GPU check: {title}", "",
             f"mode `{report['mode']}`, started {report['started']}, {report['seconds']:.0f} s; torch {env['torch']} "
             f"(CUDA {env['torch_cuda']}), cupy {env['cupy']}, SpikingJelly {env['spikingjelly']}, "
             f"commit `{(env['commit'] or '?')[:10]}`; all checks passed: **{report['ok']}**", ""]
    t = st.get("tests", {})
    lines += ["## CUDA tests", "", f"`{t.get('command', '')}`: {t.get('status')} ({t.get('summary', '')})", ""]
    b = st.get("bitwise", {})
    lines += [f"## {b.get('backend', '?')} backend vs torch backend, bit for bit", ""]
    groups: Dict[tuple, List[dict]] = {}
    for c in b.get("cases", []):
        groups.setdefault((c["dtype"], c["layout"]), []).append(c)
    if groups:
        lines += ["| dtype | layout | cases | differing values | cases with other strides |", "|---|---|---|---|---|"]
        for (dt, lay), cs in groups.items():
            lines.append(f"| {dt} | {lay} | {len(cs)} | {sum(c['differing_values'] for c in cs)} | "
                         f"{sum(not c['same_strides'] for c in cs)} |")
        lines.append("")
    for s in b.get("skipped", []):
        lines.append(f"- skipped: {s['what']}: {s['reason']}")
    lines.append("")
    n = st.get("node", {})
    lines += [f"## Node vs SpikingJelly IFNode (multi-step, implementation `{n.get('if_implementation')}`)", ""]
    if n.get("runs"):
        backends = [k for k in ("pc_cupy", "pc_native", "pc_torch") if k in n["runs"][0]["median_ms"]]
        head = ["dtype", "T", "shape", "IF ms"]
        for k in backends:
            head += [f"{k[3:]} ms", f"IF/{k[3:]}", f"{k[3:]} GB/s"]
        head += ["copy ms", "copy GB/s", "IF GB/s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in n["runs"]:
            m, g = r["median_ms"], r["effective_GBps"]
            row = [r["dtype"], str(r["T"]), "x".join(map(str, r["shape"])), _f(m["if"], 3)]
            for k in backends:
                ratio = r["ratio_if_over"].get(k)  # pc_native runs float32/float64 only
                row += [_f(m.get(k), 3), "-" if ratio is None else _f(ratio) + "x", _f(g.get(k), 1)]
            row += [_f(m["copy"], 3), _f(g["copy"], 1), _f(g["if"], 1)]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "GB/s: (input steps + output steps) x neurons x bytes per value / median time; IF/x: median "
                  "of per-round time ratios. IF implementations: "
                  + ", ".join(f"{k}: {v}" for k, v in n.get("if_implementations", {}).items()), ""]
    w = st.get("network", {})
    lines += [f"## ResNet-20 vs SpikingJelly IF-SNN ({w.get('if_recipe', '?')}, IF `{w.get('if_implementation')}`)", ""]
    if w.get("runs"):
        lines += ["| T | batch | ANN ms | count ms | spike ms | IF ms | IF/spike | IF/count | count/ANN | spike/ANN |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in w["runs"]:
            m, q = r["median_ms"], r["ratios"]
            lines.append(f"| {r['T']} | {r['batch']} | {_f(m['ann'], 3)} | {_f(m['count'], 3)} | {_f(m['spike'], 3)} | "
                         f"{_f(m['if'], 3)} | {_f(q['if/spike'])} | {_f(q['if/count'])} | {_f(q['count/ann'])} | "
                         f"{_f(q['spike/ann'])} |")
        lines.append("")
    errors = [(k, v["error"]) for k, v in st.items() if isinstance(v, dict) and v.get("error")]
    for k, e in errors:
        lines.append(f"- stage {k} failed: {e}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="every stage on tiny sizes on the CPU (the cupy comparison is skipped with its reason)")
    p.add_argument("--skip-tests", action="store_true", help="leave out the pytest stage")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each subprocess (default 900)")
    p.add_argument("--worker", choices=["node", "network"], help=argparse.SUPPRESS)
    p.add_argument("--sizes", choices=["gpu", "dry"], default="gpu", help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        sizes = DRY if args.sizes == "dry" else GPU
        fn = node_worker if args.worker == "node" else network_worker
        write_json(args.worker_out, fn(sizes, torch.device(args.device)))
        return 0

    if args.cpu_dry_run:
        device, sizes, sizes_name = torch.device("cpu"), DRY, "dry"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run with --cpu-dry-run to "
                  "exercise the stages on the CPU", file=sys.stderr)
            return 2
        device, sizes, sizes_name = torch.device("cuda", torch.cuda.current_device()), GPU, "gpu"
    start = time.perf_counter()
    report = {"schema": SCHEMA, "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu",
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "sizes": asdict(sizes), "env": describe_env(device), "stages": {}}

    def stage(name, fn):
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn()
        except Exception as exc:  # recorded; the other stages still run
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                      "tail": traceback.format_exc()[-3000:]}
        result["seconds"] = time.perf_counter() - t0
        report["stages"][name] = result
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
        return result

    if args.skip_tests:
        report["stages"]["tests"] = {"status": "skipped", "reason": "--skip-tests", "seconds": 0.0}
    else:
        stage("tests", lambda: run_tests(args.timeout))
    stage("bitwise", lambda: bitwise(sizes, device, args.cpu_dry_run))
    node = stage("node", lambda: node_stage(sizes, sizes_name, device, args.timeout))
    stage("network", lambda: network_stage(sizes_name, device, node.get("if_implementation"), args.timeout))
    report["seconds"] = time.perf_counter() - start
    report["ok"] = all(s["status"] in ("passed", "skipped") for s in report["stages"].values())
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "gpu_check.json"), report)
    text = markdown(report)
    write_text(os.path.join(args.out, "gpu_check.md"), text)
    print(text)
    print(f"[gpu_check] wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md in {report['seconds']:.0f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
