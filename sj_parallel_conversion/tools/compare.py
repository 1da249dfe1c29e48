"""Side-by-side comparison of parallel conversion with SpikingJelly's built-in converters.

:func:`compare_converters` converts one ANN with every method, evaluates each at every ``T`` on
the same data, and returns a :class:`ComparisonTable` (print it, save it as CSV/JSON, plot it).
A method that cannot convert the model gets a row that says why instead of stopping the run.
"""
from __future__ import annotations

import copy
import csv
import io
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..calibration import iterate_inputs
from ..fileio import save_plot, write_json, write_text
from ..inference import check_repeats, evaluate, evaluation_batches, predictor
from ..neuron import ParallelConversionNode
from ..progress import progress as progress_bar
from ..progress import quiet_stderr
from ..recipe import ParallelConversionRecipe, ParallelConverter, with_calibration
from ..timing import synchronize

__all__ = ["METHODS", "BUILTIN", "LABELS", "ComparisonRow", "ComparisonTable", "compare_converters", "convert_builtin",
           "evaluate_steps", "machine_label", "count_batches"]

#: Method names :func:`compare_converters` accepts, in table order.
METHODS = ("ann", "parallel", "parallel-count", "parallel-learned", "rate-cw-max", "rate-cw-99.9%",
           "rate-max", "rate-99.9%", "ltb")
#: SpikingJelly's built-in converters among :data:`METHODS`, with their ``RateCodingRecipe`` options
#: (``None``: ``LocalThresholdBalancingRecipe``). The ``rate-cw-*`` rows use SpikingJelly's strongest
#: settings (per-channel thresholds, membrane potential starting at half the threshold).
BUILTIN = {
    "rate-cw-max": dict(mode="max", channel_wise=True, half_threshold=True),
    "rate-cw-99.9%": dict(mode="99.9%", channel_wise=True, half_threshold=True),
    "rate-max": dict(mode="max"),
    "rate-99.9%": dict(mode="99.9%"),
    "ltb": None,
}
#: What each SpikingJelly baseline sets its thresholds from, for the rows' calibration column.
BUILTIN_CALIBRATION = {
    "rate-cw-max": "SpikingJelly: channel-wise max, half threshold",
    "rate-cw-99.9%": "SpikingJelly: channel-wise 99.9 %, half threshold",
    "rate-max": "SpikingJelly: layer max",
    "rate-99.9%": "SpikingJelly: layer 99.9 %",
    "ltb": "SpikingJelly: local threshold balancing",
}
#: The label of every method (and of the demo's ``parallel-ema`` rows) in tables and plots.
LABELS = {
    "ann": "ANN",
    "qcfs-ann": "QCFS ANN",
    "qcfs-parallel": "QCFS -> parallel SNN (T = L)",
    "parallel": "parallel SNN (spike-level)",
    "parallel-count": "parallel SNN (count-domain)",
    "parallel-layer-T": "parallel SNN, per-layer T at its largest T (spike-level)",
    "parallel-count-layer-T": "parallel SNN, per-layer T at its largest T (count-domain)",
    "parallel-learned": "parallel SNN, learned calibration (count-domain)",
    "parallel-ema": "parallel SNN, Algorithm 1 (count-domain)",
    "rate-cw-max": "SJ RateCodingRecipe max, channel-wise, half threshold (IF)",
    "rate-cw-99.9%": "SJ RateCodingRecipe 99.9%, channel-wise, half threshold (IF)",
    "rate-max": "SJ RateCodingRecipe max (IF)",
    "rate-99.9%": "SJ RateCodingRecipe 99.9% (IF)",
    "ltb": "SJ LocalThresholdBalancing (IF)",
}


def provenance() -> Dict[str, str]:
    """Versions of this package, torch, SpikingJelly and Python, the platform, and the time (UTC)
    at which a result file is written: what a reader needs to reproduce it."""
    import datetime
    import sys
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {"sj_parallel_conversion": version("sj-parallel-conversion"), "torch": torch.__version__,
            "spikingjelly": version("spikingjelly"), "python": sys.version.split()[0],
            "platform": platform.platform(), "written": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def machine_label(device="cpu") -> str:
    """What the timings were measured on: the CPU (or GPU) model and torch's thread count."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    cpu = ""
    try:  # Linux names the CPU model here; platform.processor() is often empty or just "x86_64"
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    n = torch.get_num_threads()
    return f"{cpu}, {n} thread{'' if n == 1 else 's'}"


def count_batches(loader: Iterable, num_batches: Optional[int] = None) -> int:
    """Batches an evaluation over ``loader`` times: ``len(loader)`` capped at ``num_batches``, or 1
    where the loader has no length (a plot then shows no throughput unless it was repeated)."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = 1
    return max(1, min(n, num_batches) if num_batches is not None else n)


@dataclass
class ComparisonRow:
    method: str
    T: Optional[int]
    accuracy: Optional[float]
    images: int
    convert_s: float = 0.0
    eval_s: float = 0.0
    status: str = "ok"
    #: The calibration the network got (``snn.calibration_report.label``: ``"distill (auto)"``,
    #: ``"ema"``, ...), or the baseline's own threshold setting; empty for the ANN.
    calibration: str = ""

    @property
    def images_per_s(self) -> Optional[float]:
        return self.images / self.eval_s if self.eval_s > 0 and self.accuracy is not None else None


@dataclass
class ComparisonTable:
    """Rows of a comparison. ``timed_calls``: timed forward calls per evaluation (test batches
    times repeats); each row's ``eval_s`` is its images times their median per-image time.
    ``machine``: where they ran (:func:`machine_label`). :meth:`plot` draws throughput only when
    ``timed_calls >= 2``: a single timing on a shared machine shows its load as much as the method."""

    rows: List[ComparisonRow] = field(default_factory=list)
    title: str = ""
    timed_calls: int = 1
    machine: str = ""
    #: What produced the rows beyond the versions :func:`provenance` adds (the command, the
    #: number of calibration images, the seed...); written to the JSON file.
    run: Dict = field(default_factory=dict)

    def as_dicts(self) -> List[Dict]:
        out = []
        for r in self.rows:
            d = asdict(r)
            d["label"] = LABELS.get(r.method, r.method)
            d["images_per_s"] = r.images_per_s
            out.append(d)
        return out

    def to_text(self) -> str:
        """A plain-text table (accuracy in %, wall time per configuration)."""
        from tabulate import tabulate

        body = []
        for r in self.rows:
            acc = "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}"
            ips = r.images_per_s
            body.append([LABELS.get(r.method, r.method), "-" if r.T is None else r.T, r.calibration or "-", acc,
                         f"{r.convert_s:.2f}", f"{r.eval_s:.2f}", "-" if ips is None else f"{ips:.0f}", r.status])
        text = tabulate(body, headers=["method", "T", "calibration", "acc %", "convert s", "eval s", "img/s", "status"],
                        tablefmt="github")
        return f"{self.title}\n{text}" if self.title else text

    def __str__(self) -> str:
        return self.to_text()

    def to_json(self, path: str) -> None:
        write_json(path, {"title": self.title, "timed_calls": self.timed_calls,
                          "machine": self.machine or machine_label(), "provenance": {**provenance(), **self.run},
                          "rows": self.as_dicts()})

    @classmethod
    def from_json(cls, path: str) -> "ComparisonTable":
        """Read a table written by :meth:`to_json` (to re-plot it, for instance)."""
        import json

        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise ValueError(f"ComparisonTable.from_json: {path} holds no 'rows' list")
        names = {f.name for f in ComparisonRow.__dataclass_fields__.values()}
        try:
            rows = [ComparisonRow(**{k: v for k, v in r.items() if k in names}) for r in doc["rows"]]
        except TypeError as exc:
            raise ValueError(f"ComparisonTable.from_json: {path}: a row lacks a field ({exc})") from None
        return cls(rows=rows, title=doc.get("title", ""), timed_calls=doc.get("timed_calls", 1),
                   machine=doc.get("machine", ""))

    def to_csv(self, path: str) -> None:
        rows = self.as_dicts()
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["method"])
        w.writeheader()
        w.writerows(rows)
        write_text(path, buf.getvalue())

    def accuracy(self, method: str, T: Optional[int] = None) -> Optional[float]:
        for r in self.rows:
            if r.method == method and (T is None or r.T == T):
                return r.accuracy
        raise KeyError(f"no row for method={method!r}, T={T!r}")

    def plot(self, path: str) -> str:
        """Accuracy vs T for every method, saved as a PNG; with ``timed_calls >= 2`` also throughput
        vs T (from the median per-image time), labelled with :attr:`machine`."""
        save_plot(self._figure(), path, tight=False)  # _figure lays out around its legend itself
        return path

    def _figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        speed = self.timed_calls >= 2
        fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(11.5 if speed else 9.0, 4.6), squeeze=False)
        ax_acc, ax_speed = axes[0][0], axes[0][1] if speed else None
        methods = [m for m in dict.fromkeys(r.method for r in self.rows) if m != "ann"]
        # Methods can coincide (spike-level and count-domain rows agree by construction): give each
        # its own marker, line style, width and a horizontal offset so that no line hides another.
        markers, styles = "osD^vPX*", ("-", "--", ":", "-.")
        for i, m in enumerate(methods):
            pts = sorted((r.T, r.accuracy, r.images_per_s) for r in self.rows
                         if r.method == m and r.accuracy is not None and r.T is not None)
            if not pts:
                continue
            nudge = 2 ** (0.05 * (i - (len(methods) - 1) / 2))  # log-x axis: a multiplicative offset
            ts = [p[0] * nudge for p in pts]
            # Earlier lines are drawn wider, so one that coincides with a later line shows around it.
            style = dict(marker=markers[i % len(markers)], ls=styles[i % len(styles)], ms=7 if i % 2 else 5,
                         mfc="none" if i % 2 else None, mew=1.5, lw=max(1.3, 3.2 - 0.7 * i),
                         label=LABELS.get(m, m))
            ax_acc.plot(ts, [100 * p[1] for p in pts], **style)
            if speed and all(p[2] for p in pts):
                ax_speed.plot(ts, [p[2] for p in pts], **style)
        for r in self.rows:
            if r.method == "ann" and r.accuracy is not None:
                ax_acc.axhline(100 * r.accuracy, color="k", ls="--", lw=1, label="ANN")
                if speed and r.images_per_s:
                    ax_speed.axhline(r.images_per_s, color="k", ls="--", lw=1, label="ANN")
        Ts = sorted({r.T for r in self.rows if r.T is not None})
        for ax in axes[0]:
            ax.set_xscale("log", base=2)
            if Ts:
                ax.set_xticks(Ts, [str(t) for t in Ts])
            ax.set_xlabel("time steps T (points of one T are spread sideways)")
            ax.grid(alpha=0.3)
        ax_acc.set_ylabel("accuracy (%)")
        ax_acc.set_title("accuracy vs T")
        bottom = 0.0
        if speed:  # two panels: the legend below both, where it hides no line
            handles, labels = ax_acc.get_legend_handles_labels()
            rows = -(-len(labels) // 3)
            fig.set_size_inches(11.5, 4.6 + 0.2 * rows)
            bottom = (0.2 * rows + 0.1) / (4.6 + 0.2 * rows)
            fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
        else:  # one panel: the legend beside it
            ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
        if speed:
            ax_speed.set_ylabel("images / s")
            ax_speed.set_yscale("log")
            spiking = any(r.method in BUILTIN for r in self.rows)
            counted = any(r.method.startswith("parallel-count") or r.method in ("parallel-ema", "parallel-learned")
                          for r in self.rows)
            kinds = "\ncount-domain rows run one pass without spikes; SJ rows run T spiking steps" if (
                spiking and counted) else ""
            ax_speed.set_title(f"throughput vs T (per-image median of {self.timed_calls} timed calls)\n"
                               f"{self.machine or 'machine not recorded'}{kinds}", fontsize=9)
        if self.title:
            import textwrap

            fig.suptitle(textwrap.fill(self.title, 110), fontsize=10)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        return fig


def convert_builtin(method: str, ann: nn.Module, calib: Iterable, num_calib_batches: Optional[int] = None,
                    device="cpu", progress: bool = True) -> nn.Module:
    """Convert ``ann`` with one of SpikingJelly's built-in recipes into a multi-step IF-neuron SNN.

    ``method``: a key of :data:`BUILTIN`: ``'rate-cw-max'`` / ``'rate-cw-99.9%'``
    (``RateCodingRecipe`` with ``channel_wise=True, half_threshold=True``), ``'rate-max'`` /
    ``'rate-99.9%'`` (``RateCodingRecipe`` defaults) or ``'ltb'``
    (``LocalThresholdBalancingRecipe``). ``ann`` is not modified.
    """
    from spikingjelly.activation_based import ann2snn

    if method not in BUILTIN:
        raise ValueError(f"convert_builtin: method must be one of {sorted(BUILTIN)}, got {method!r}")
    options = BUILTIN[method]
    if options is None:
        make = ann2snn.LocalThresholdBalancingRecipe
    else:
        make = lambda data: ann2snn.RateCodingRecipe(data, **options)
    loader = list(iterate_inputs(calib, device, num_calib_batches, progress=False))
    # SpikingJelly's recipes draw their own bar with no switch; keep it off the screen with ours.
    with quiet_stderr(progress):
        snn = ann2snn.Converter(make(loader), device=device).convert(copy.deepcopy(ann))
    functional.set_step_mode(snn, "m")
    return snn.eval()


def calibration_label(snn: nn.Module) -> str:
    """What calibration a converted parallel network got, for result rows: its report's label, or
    ``"none"`` where it got none (``calibrate=False``, or QCFS at ``T == L``, which needs none)."""
    report = getattr(snn, "calibration_report", None)
    return report.label if report is not None else "none"


def compare_converters(
    ann: nn.Module,
    calib_loader: Iterable,
    test_loader: Iterable,
    T_list: Sequence[int],
    methods: Sequence[str] = METHODS,
    num_calib_batches: Optional[int] = None,
    num_test_batches: Optional[int] = None,
    device="cpu",
    progress: bool = True,
    title: str = "",
    recipe_options: Optional[Dict] = None,
    repeats: int = 1,
) -> ComparisonTable:
    """Accuracy and wall time of every method at every ``T`` on the same model and data.

    ``methods`` is a subset of :data:`METHODS`. Conversion time is measured per configuration
    (the built-in recipes convert once, independent of T); evaluation time covers the forward
    passes only: the images times the median per-image time of every test batch timed
    ``repeats`` times (the plot shows throughput only with at least two timed calls).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    Ts = list(T_list)
    if not Ts or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in Ts):
        raise ValueError(f"T_list must hold integers >= 1, got {T_list!r}")
    check_repeats(repeats, "compare_converters")
    ann = ann.to(device).eval()
    table = ComparisonTable(title=title, timed_calls=repeats * count_batches(test_loader, num_test_batches),
                            machine=machine_label(device))
    ev = dict(device=device, num_batches=num_test_batches, progress=progress, repeats=repeats)

    want_spike, want_count = "parallel" in methods, "parallel-count" in methods
    if want_spike or want_count:
        for T in Ts:
            t0 = time.perf_counter()
            try:
                options = with_calibration(recipe_options, num_batches=num_calib_batches)
                snn = ParallelConverter(ParallelConversionRecipe(T, calib_loader, progress=progress, **options),
                                        device=device).convert(copy.deepcopy(ann))
            except Exception as exc:
                for m in ("parallel", "parallel-count"):
                    if m in methods:
                        table.rows.append(ComparisonRow(m, T, None, 0, time.perf_counter() - t0, 0.0,
                                                        f"cannot convert: {exc}"))
                continue
            conv = time.perf_counter() - t0
            label = calibration_label(snn)
            if want_spike:
                acc, n, sec = evaluate(predictor(snn, T), test_loader, desc=f"parallel T={T}", **ev)
                table.rows.append(ComparisonRow("parallel", T, acc, n, conv, sec, calibration=label))
            if want_count:
                acc, n, sec = evaluate(predictor(snn, T, count_domain=True), test_loader,
                                       desc=f"count-domain T={T}", **ev)
                table.rows.append(ComparisonRow("parallel-count", T, acc, n, conv, sec, calibration=label))

    if "parallel-learned" in methods:
        options = {**with_calibration(recipe_options, num_batches=num_calib_batches), "method": "learned"}
        for T in Ts:
            t0 = time.perf_counter()
            try:
                snn = ParallelConverter(ParallelConversionRecipe(T, calib_loader, progress=progress, **options),
                                        device=device).convert(copy.deepcopy(ann))
            except Exception as exc:
                table.rows.append(ComparisonRow("parallel-learned", T, None, 0, time.perf_counter() - t0, 0.0,
                                                f"cannot convert: {exc}"))
                continue
            conv = time.perf_counter() - t0
            acc, n, sec = evaluate(predictor(snn, T, count_domain=True), test_loader,
                                   desc=f"learned T={T}", **ev)
            table.rows.append(ComparisonRow("parallel-learned", T, acc, n, conv, sec, calibration=calibration_label(snn)))

    for m in BUILTIN:
        if m not in methods:
            continue
        t0 = time.perf_counter()
        try:
            snn = convert_builtin(m, ann, calib_loader, num_calib_batches, device, progress=progress)
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            for T in Ts:
                table.rows.append(ComparisonRow(m, T, None, 0, time.perf_counter() - t0, 0.0,
                                                f"cannot convert: {type(exc).__name__}: {msg[:120]}"))
            continue
        conv = time.perf_counter() - t0
        results = evaluate_steps(snn, test_loader, Ts, device=device, num_batches=num_test_batches,
                                 desc=f"{m} T={max(Ts)}", progress=progress, repeats=repeats)
        for T in Ts:
            acc, n, sec = results[T]
            status = "ok" if T == max(Ts) else f"ok (from the T={max(Ts)} run, time scaled by T/{max(Ts)})"
            table.rows.append(ComparisonRow(m, T, acc, n, conv, sec, status, calibration=BUILTIN_CALIBRATION[m]))
    if "ann" in methods:
        # Timed last, listed first: a process's first timings pay for fresh memory (page faults
        # until the allocator keeps its freed blocks), which made the ANN look slower than the
        # count domain that costs about as much.
        acc, n, sec = evaluate(ann, test_loader, desc="ANN", **ev)
        table.rows.insert(0, ComparisonRow("ann", None, acc, n, 0.0, sec))
    return table


@torch.no_grad()
def evaluate_steps(snn: nn.Module, loader: Iterable, T_list: Sequence[int], device="cpu",
                   num_batches: Optional[int] = None, desc: str = "evaluating", progress: bool = True,
                   repeats: int = 1):
    """Accuracy of a multi-step SNN with causal neurons (SpikingJelly's IF conversions) at every
    ``T`` in ``T_list`` from one run of ``max(T_list)`` steps.

    An IF network's first ``T`` output steps do not depend on later input steps, so the mean of
    the first ``T`` outputs of one long run is what a run of ``T`` steps returns: cumulative sums
    of the output give every smaller ``T`` at the cost of the largest. (Parallel neurons are not
    causal: each reads the mean of all its input steps; convert and run them per ``T``.)

    Returns ``{T: (accuracy, images, seconds)}``. ``seconds`` is the measured time of the long run
    for ``max(T_list)`` and that time scaled by ``T / max(T_list)`` for the others, since an IF
    network's multi-step cost is linear in the number of steps. One untimed warm-up call on the
    first 8 images of the first batch; every batch's run is timed ``repeats`` times and the long
    run's time is the number of images times the median per-image time, as in :func:`evaluate`.
    """
    from ..inference import spike_inference

    if any(isinstance(m, ParallelConversionNode) for m in snn.modules()):
        raise ValueError("evaluate_steps: the model has parallel neurons, whose output at T steps is not a "
                         "prefix of a longer run; evaluate it per T with evaluate(predictor(snn, T), ...)")
    Ts = sorted(set(T_list))
    if not Ts or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in Ts):
        raise ValueError(f"evaluate_steps: T_list must hold integers >= 1, got {T_list!r}")
    check_repeats(repeats, "evaluate_steps")
    t_max = Ts[-1]
    correct = {T: 0 for T in Ts}
    total, per_image, warm = 0, [], False
    for x, y in progress_bar(evaluation_batches(loader, device, num_batches), desc, progress):
        if not warm:  # a few images suffice to set up kernels; a full batch would double a long run
            spike_inference(snn, x[:8], t_max)
            warm = True
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            out = spike_inference(snn, x, t_max)  # [T_max, N, classes]
            synchronize(device)
            per_image.append((time.perf_counter() - t0) / len(x))
        sums = out.cumsum(0)  # argmax of a sum is the argmax of the mean
        for T in Ts:
            correct[T] += int((sums[T - 1].argmax(-1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("evaluate_steps: the evaluation loader yielded no batch")
    seconds = statistics.median(per_image) * total
    return {T: (correct[T] / total, total, seconds * T / t_max) for T in Ts}
