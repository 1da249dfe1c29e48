"""Calibration methods side by side: accuracy on held-out CIFAR-10 test images and calibration time.

For each network and each T, the ANN is converted with every method asked for (no calibration,
Algorithm 1 as published, Algorithm 1 with this library's settings, moment matching, mse
thresholds, learned, distill, auto) with the same calibration images, and each converted network
is evaluated in the count domain on the same test images. Writes a Markdown table, a JSON file
and a plot (accuracy vs T, one panel per network). Networks are the project's checkpoints
(``--checkpoint``) or any model with its weights (``--model MODULE:CALLABLE --weights FILE``,
normalised with ``--mean``/``--std``), e.g. the public pretrained ResNets:

    python benchmarks/calibration_methods.py \\
        --checkpoint sj_parallel_conversion/tools/checkpoints/cifar10_resnet20_relu.pt \\
        --T 2 4 8 16 32 --calib-images 1024 --test-images 2000 --out docs/results/calibration_methods_resnet20
    PYTHONPATH=tests python benchmarks/calibration_methods.py --model pretrained_resnets:resnet32 \\
        --weights ../shared/data/pretrained_cifar10_resnets/resnet32-d509ac18.th \\
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --T 4 8 --out docs/results/calibration_methods_resnet32
    python benchmarks/calibration_methods.py --combine docs/results/calibration_methods_*.json \\
        --out docs/results/calibration_methods

With ``--combine``, a cell (model, T, method) found in several files is taken from the last one.
"""
from __future__ import annotations

import argparse
import json
import copy
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sj_parallel_conversion import (CalibrationSettings, ParallelConverter, count_domain_model,  # noqa: E402
                                    load_user_model)
from sj_parallel_conversion.tools import data, models  # noqa: E402
from sj_parallel_conversion.tools.compare import calibration_label  # noqa: E402
from sj_parallel_conversion.fileio import save_figure, write_json, write_text  # noqa: E402
from sj_parallel_conversion.learned import DistillCalibration, LearnedCalibration  # noqa: E402
from sj_parallel_conversion.recipe import with_calibration  # noqa: E402

METHODS = {
    "none": dict(calibration=CalibrationSettings(calibrate=False)),
    "paper": dict(method="paper"),
    "ema": dict(method="ema"),
    "moment": dict(method="moment"),
    "mse": dict(method="mse"),
    "learned": dict(method="learned"),
    "distill": dict(method="distill"),
    "auto": dict(method="auto"),
}
LABELS = {"none": "no calibration", "paper": "Algorithm 1 as published", "ema": "Algorithm 1 (bias-corrected)",
          "moment": "moment matching", "mse": "mse thresholds + Algorithm 1", "learned": "learned (thresholds)",
          "distill": "distill (thresholds and weights)", "auto": "auto (default)"}
#: What each method is given, for the rows (the images are the same for all).
SETTINGS = {
    "none": "max thresholds, no calibration",
    "paper": "alpha 0.99, no bias correction, convolution sites, every calibration image",
    "ema": "alpha 0.99 with bias correction, every site, every calibration image",
    "moment": "moment matching, every calibration image",
    "mse": "squared-error thresholds, then Algorithm 1 (bias-corrected), every calibration image",
    "learned": "fit on 80 %, early stopping on 20 % of the calibration images",
    "distill": "fit on 80 %, early stopping on 20 % of the calibration images",
    "auto": (f"selection on 12.5 % and {CalibrationSettings().selection_blends} blends of each selection image "
             "(a calibration replaces none only if clearly better there: sign test); fits on "
             "70 %, early stopping on 17.5 % of the calibration images"),
}


def accuracy(snn, x, y, batch=500) -> float:
    correct = 0
    counted = count_domain_model(snn)  # built once for all batches
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            correct += int((counted(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / x.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+")
    p.add_argument("--model", help="MODULE:CALLABLE, a zoo name or torchvision:NAME (with --weights)")
    p.add_argument("--weights", help="state_dict file for --model")
    p.add_argument("--name", help="the network's name in the table (default: the weights file's)")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="input normalisation (default CIFAR-10's)")
    p.add_argument("--std", type=float, nargs="+", default=None)
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="instead of measuring: merge the .json files of earlier runs into one table and plot")
    p.add_argument("--T", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--calib-images", type=int, default=1024, help="class-balanced training images (labels unused)")
    p.add_argument("--test-images", type=int, default=2000, help="class-balanced test images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="learned calibration: at most this many steps")
    p.add_argument("--seed", type=int, default=0,
                   help="learned calibration: seed of the minibatch order (another seed shows the fit's spread)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="docs/results/calibration_methods", help="output prefix (.md, .json, .png)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.checkpoint, args.combine, args.model))) != 1:
        p.error("give one of --checkpoint or --model (measure) or --combine (merge earlier runs)")
    if args.combine:
        runs = [json.load(open(f)) for f in args.combine]
        # A cell measured again in a later file replaces the earlier one (a rerun after a change
        # of defaults); the table lists every command that contributed.
        cells = {}
        for run in runs:
            for r in run["rows"]:
                cells[(r["model"], r["T"], r["method"])] = r
        combined = "python benchmarks/calibration_methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write(list(cells.values()), args.out, [run["command"] for run in runs],
              sorted({run["machine"] for run in runs}),
              runs[0].get("images", dict(test=args.test_images, calibration=args.calib_images)), combined)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    norm = dict(mean=args.mean, std=args.std)
    calib = data.cifar10_npz("train", limit=args.calib_images, **norm).tensors[0]
    test_x, test_y = data.cifar10_npz("test", limit=args.test_images, **norm).tensors
    batches = list(torch.split(calib, args.batch_size))
    fit_options = dict(seed=args.seed, **({} if args.steps is None else {"steps": args.steps}))
    learned, distill = LearnedCalibration(**fit_options), DistillCalibration(**fit_options)
    results = []
    networks = [(p, None) for p in args.checkpoint] if args.checkpoint else [(args.weights, args.model)]
    for path, spec in networks:
        if spec is None:
            ann, meta = models.load_checkpoint(path)
        else:
            ann = load_user_model(spec, path)
        ann.eval()
        name = args.name or os.path.splitext(os.path.basename(path))[0]
        with torch.no_grad():
            ann_acc = 100.0 * sum(int((ann(test_x[i:i + 500]).argmax(1) == test_y[i:i + 500]).sum())
                                  for i in range(0, len(test_x), 500)) / len(test_x)
        print(f"{name}: ANN {ann_acc:.2f} %", flush=True)
        for T in args.T:
            for method in args.methods:
                start = time.perf_counter()
                options = with_calibration(METHODS[method], learned=learned, distill=distill)
                snn = ParallelConverter("parallel", T=T, dataloader=batches, progress=False,
                                        **options).convert(copy.deepcopy(ann))
                seconds = time.perf_counter() - start
                acc = accuracy(snn, test_x, test_y)
                report = snn.calibration_report
                row = dict(model=name, T=T, method=method, accuracy=acc, ann_accuracy=ann_acc,
                           calibration_seconds=seconds, load_average=os.getloadavg()[0],
                           chosen=report.method if report else "none", calibration=calibration_label(snn),
                           settings=SETTINGS[method], held_out=report.scores if report else {},
                           skipped=report.skipped if report else {},
                           fit=({k: report.learned.get(k) for k in ("kept_step", "steps_run", "fell_back", "views",
                                                                     "fit_images", "held_out_images", "fall_back_check")}
                                if report and report.learned else None))
                results.append(row)
                print(f"  T={T:<3} {method:<8} {acc:6.2f} %  {seconds:7.1f} s  {row['calibration']}", flush=True)
                # After every row: a long sweep cut short keeps what it measured.
                write(results, args.out, ["python benchmarks/calibration_methods.py " + " ".join(sys.argv[1:])],
                      [_machine()], dict(test=args.test_images, calibration=args.calib_images))
    return 0


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def write(results, out, commands, machines, images, combined=None) -> None:
    loads = [r["load_average"] for r in results if "load_average" in r]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out + ".json", {"command": commands[0] if len(commands) == 1 else commands,
                               "machine": "; ".join(machines), "images": images, "rows": results}, indent=1)
    load = f"a 1-minute load average of up to {max(loads):.1f}" if loads else "an unrecorded load"
    lines = ["Commands:", ""] + [f"    {c}" for c in commands] + (
        ["", "Combined (a cell measured in several runs is taken from the last file named):", "",
         f"    {combined}"] if combined else []) + [
        "", f"Machine: {'; '.join(machines)}. Count-domain accuracy (%) on {images['test']} "
        f"class-balanced CIFAR-10 test images; calibration on {images['calibration']} training images "
        f"(labels unused); calibration time in seconds (conversion included), measured with {load} on "
        "the machine (times are comparable only at a low load). What each method is given:", ""] + [
        f"- {LABELS[m]}: {SETTINGS[m]}" for m in METHODS if any(r["method"] == m for r in results)] + [""]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        Ts = sorted({r["T"] for r in rows})
        lines += [f"### {model} (ANN {rows[0]['ann_accuracy']:.2f} %)", "",
                  "| method | " + " | ".join(f"T={t}" for t in Ts) + " | time (s) at each T |",
                  "|---|" + "---|" * len(Ts) + "---|"]
        for m in [m for m in METHODS if any(r["method"] == m for r in rows)]:
            cells, times = [], []
            for t in Ts:
                r = next((r for r in rows if r["method"] == m and r["T"] == t), None)
                cells.append("" if r is None else f"{r['accuracy']:.2f}" + (f" ({r['chosen']})" if m == "auto" else ""))
                times.append("" if r is None else f"{r['calibration_seconds']:.0f}")
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " | " + " / ".join(times) + " |")
        lines.append("")
    write_text(out + ".md", "\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models_ = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models_), figsize=(5 * len(models_), 3.8), squeeze=False)
    markers = {"none": "o", "paper": "v", "ema": "s", "moment": "^", "mse": "P", "learned": "D", "distill": "*",
               "auto": "x"}
    for ax, model in zip(axes[0], models_):
        rows = [r for r in results if r["model"] == model]
        for i, m in enumerate(METHODS):
            pts = sorted((r["T"], r["accuracy"]) for r in rows if r["method"] == m)
            if not pts:
                continue
            # One colour per method in every panel (the legend is drawn once); a small horizontal
            # offset per method keeps overlapping lines visible.
            ax.plot([t * (1 + 0.03 * (i - 2)) for t, _ in pts], [a for _, a in pts], marker=markers[m],
                    color=f"C{i}", label=LABELS[m], linestyle="--" if m == "auto" else "-")
        ax.axhline(rows[0]["ann_accuracy"], color="gray", linestyle=":", label="ANN")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["T"] for r in rows}))
        ax.set_xticklabels(sorted({r["T"] for r in rows}))
        ax.set_xlabel("T (time steps)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    # One legend for every method drawn in any panel (a method may be missing from the first).
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[0][0].legend(handles.values(), handles.keys(), fontsize=8)
    fig.tight_layout()
    save_figure(fig, out + ".png", dpi=120)
    plt.close(fig)  # written after every row: a long sweep would otherwise keep every figure


if __name__ == "__main__":
    raise SystemExit(main())
