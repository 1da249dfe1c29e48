"""The main job (``sj-parallel demo``, ``bash tools/run.sh``): convert the shipped CIFAR-10 ResNet-20
with the parallel recipe and with SpikingJelly's own converters, print the table, write the plot.

Everything it reads ships inside the package: the ReLU ResNet-20 checkpoint
(``checkpoints/cifar10_resnet20_relu.pt``) and the CIFAR-10 subset
(:func:`~sj_parallel_conversion.tools.data.cifar10_subset`); nothing is downloaded and
``$SJPC_CIFAR10_DIR`` is not needed. Algorithm 1 at every ``T``, learned calibration at ``T = 4``
(a short fit on the 1,024 shipped training images) and SpikingJelly's strongest IF setting; one
to two minutes on 2 CPU cores.

``data="digits"`` runs the earlier, smaller demo instead: two tiny CNNs trained on scikit-learn's
8x8 digits (a QCFS CNN converted losslessly at T = L, and a ReLU CNN converted both ways).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from . import data, models
from ..fileio import write_text
from .compare import (BUILTIN, BUILTIN_CALIBRATION, ComparisonRow, ComparisonTable, calibration_label,
                      compare_converters, convert_builtin, count_batches, evaluate, evaluate_steps, machine_label)
from ..inference import predictor, spike_inference
from ..learned import LearnedCalibration
from ..recipe import CalibrationSettings, ParallelConversionRecipe, ParallelConverter
from .training import train_classifier

__all__ = ["run_demo", "planned_rows", "CIFAR_CHECKPOINT", "CIFAR_T", "DEMO_DATA", "DEMO_OPTIONS", "LEARN_STEPS",
           "REPEATS"]

#: The checkpoint the CIFAR-10 demo converts (shipped with the package).
CIFAR_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "cifar10_resnet20_relu.pt"
#: Values of ``run_demo(data=...)``.
DEMO_DATA = ("cifar10", "digits")
#: SpikingJelly baseline of the CIFAR-10 demo: RateCodingRecipe's strongest setting (channel-wise,
#: half threshold, 99.9 % percentile). Others (``compare.BUILTIN``) cost one IF run of the largest T each.
CIFAR_BASELINES = ("rate-cw-99.9%",)
#: Default optimisation steps of the demo's learned calibration: a short fit that keeps the whole
#: demo within two minutes on 2 CPU cores (``LearnedCalibration``'s own default is 600).
LEARN_STEPS = 120
#: Default timed runs of every test batch. Times are the median per-image time over all timed
#: batches: the CIFAR-10 demo's 256 test images in batches of 64 already give 4 timings, and
#: repeating its 32-step IF run would cost more than the learned calibration.
REPEATS = 1
#: Test batch size of the CIFAR-10 demo.
TEST_BATCH = 64
#: Default time steps of the CIFAR-10 demo.
CIFAR_T = (4, 8, 16, 32)


def _check_T_list(T_list: Sequence[int], name: str = "T_list", empty: bool = False) -> list:
    Ts = list(T_list)
    if (not Ts and not empty) or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in Ts):
        raise ValueError(f"run_demo: {name} must hold integers >= 1, got {T_list!r}")
    return sorted(set(Ts))


#: Options of one demo only: ``name: (CLI option, default)``. ``run_demo`` refuses a given option
#: of the other demo (rather than ignoring it) and fills in these defaults.
DEMO_OPTIONS = {
    "cifar10": {"test_images": ("--images", 256), "calib_images": ("--calib-images", 256),
                "baselines": ("--baselines", CIFAR_BASELINES), "learned_T": ("--learned-T / --no-learned", None),
                "learn_steps": ("--learn-steps", LEARN_STEPS), "learn_images": ("--learn-images", 1024)},
    "digits": {"epochs": ("--epochs", 15), "L": (None, 4)},  # L: no CLI option
}


def run_demo(out_dir: str = "runs/demo", data: str = "cifar10", T_list: Optional[Sequence[int]] = None,
             test_images: Optional[int] = None, calib_images: Optional[int] = None,
             baselines: Optional[Sequence[str]] = None, learned_T: Optional[Sequence[int]] = None,
             learn_steps: Optional[int] = None, learn_images: Optional[int] = None, repeats: int = REPEATS,
             epochs: Optional[int] = None, seed: int = 0, progress: bool = True,
             L: Optional[int] = None) -> ComparisonTable:
    """Convert, evaluate, compare; print the table and write ``table.md``, ``table.json`` and
    ``accuracy_speed.png`` into ``out_dir``.

    Options marked CIFAR-10 or digits belong to that demo only: ``None`` (default) takes the
    default given here, and a value given for the other demo raises ``ValueError``.

    Args:
        data: ``"cifar10"`` (the shipped ResNet-20 and CIFAR-10 subset) or ``"digits"``.
        T_list: time steps (default 4, 8, 16, 32 for CIFAR-10; 2, 4, 8, 16, 32 for digits).
        test_images: CIFAR-10: test images to evaluate on (at most 1,000, class-balanced; default 256).
        calib_images: CIFAR-10: training images Algorithm 1 calibrates on (at most 1,024,
            class-balanced; default 256).
        baselines: CIFAR-10: SpikingJelly converters to compare with (keys of
            :data:`~sj_parallel_conversion.tools.compare.BUILTIN`; default :data:`CIFAR_BASELINES`), each
            evaluated at every ``T`` from one IF run of the largest ``T``.
        learned_T: CIFAR-10: the ``T`` that also get a row with learned calibration
            (``method="learned"``, a :class:`~.learned.LearnedCalibration` of ``learn_steps`` steps
            on ``learn_images`` images, a quarter of them held out); each must be in ``T_list``.
            ``None`` (default): ``T = 4`` where it is converted; ``()``: none.
        learn_steps: CIFAR-10: optimisation steps of each learned calibration (default :data:`LEARN_STEPS`).
        learn_images: CIFAR-10: training images of each learned calibration (at most 1,024; default 1,024).
        repeats: timed runs of every test batch; times are the images times the median per-image
            time of all timed batches (the plot shows throughput with two or more).
        epochs: digits: training epochs of each tiny CNN (default 15).
        seed: CIFAR-10: seed of the learned calibration's minibatch order; digits: seed of the
            tiny CNNs' initialisation and training order.
        L: digits: QCFS levels of the QCFS CNN (default 4).
    """
    if data not in DEMO_DATA:
        raise ValueError(f"run_demo: data must be one of {DEMO_DATA}, got {data!r}")
    arguments = locals()
    given = {name: arguments[name] for options in DEMO_OPTIONS.values() for name in options}
    opts = {}
    for owner, options in DEMO_OPTIONS.items():
        for name, (flag, default) in options.items():
            if owner != data and given[name] is not None:
                named = f"{name} ({flag})" if flag else name
                raise ValueError(f"run_demo: {named} applies to data={owner!r} (demo --data {owner}) only, "
                                 f"not {data!r}")
            opts[name] = default if given[name] is None else given[name]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"run_demo: repeats must be an integer >= 1, got {repeats!r}")
    if data == "digits":
        for name in ("epochs", "L"):
            v = opts[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"run_demo: {name} must be an integer >= 1, got {v!r}")
        changed = {"epochs": given["epochs"], "T_list": T_list and _check_T_list(T_list),
                   "repeats": repeats if repeats != REPEATS else None}
        return _run_digits(out_dir, _check_T_list(T_list or (2, 4, 8, 16, 32)), opts["epochs"], seed, progress,
                           opts["L"], repeats, _command("digits", changed))
    # The one check of these sizes; the CLI option is named in the message.
    for name, top, low in (("test_images", 1000, 1), ("calib_images", 1024, 2), ("learn_images", 1024, 4)):
        value, flag = opts[name], DEMO_OPTIONS["cifar10"][name][0]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise ValueError(f"run_demo: {name} ({flag}) must be an integer in {low}..{top} (the shipped "
                             f"CIFAR-10 subset holds {top} {'test' if top == 1000 else 'training'} images), "
                             f"got {value!r}")
    unknown = [b for b in opts["baselines"] if b not in BUILTIN]
    if unknown:
        raise ValueError(f"run_demo: unknown baselines {unknown}; choose from {sorted(BUILTIN)}")
    Ts = _check_T_list(T_list or CIFAR_T)
    if opts["learned_T"] is None:
        learned = {4} & set(Ts)
    else:
        learned = set(_check_T_list(opts["learned_T"], "learned_T", empty=True))
        if not learned <= set(Ts):
            raise ValueError(f"run_demo: learned_T {sorted(learned - set(Ts))} not among the T converted, {Ts}")
    # Options are checked here, before any work (LearnedCalibration names a bad one).
    options = LearnedCalibration(steps=opts["learn_steps"], eval_every=20, max_images=opts["learn_images"], seed=seed)
    changed = {name: given[name] for name in DEMO_OPTIONS["cifar10"] if given[name] is not None}
    command = _command("cifar10", {"T_list": T_list and Ts, **changed,
                                   "repeats": repeats if repeats != REPEATS else None})
    return _run_cifar10(out_dir, Ts, opts["test_images"], opts["calib_images"], list(opts["baselines"]), learned,
                        options, repeats, progress, command)


def planned_rows(T_list: Sequence[int] = CIFAR_T, learned_T: Sequence[int] = (4,),
                 baselines: Sequence[str] = CIFAR_BASELINES) -> list:
    """``(method, T)`` of the CIFAR-10 demo's rows, in table order (defaults: the default demo)."""
    Ts = sorted(set(T_list))
    return ([("ann", None)] + [("parallel-ema", T) for T in Ts]
            + [("parallel-learned", T) for T in sorted(set(learned_T))] + [(m, T) for m in baselines for T in Ts])


def _command(data: str, options: dict) -> str:
    """The ``sj-parallel demo`` command line that gives these options (those left at their defaults omitted)."""
    flags = {"T_list": "--T", "repeats": "--repeats"}
    parts = ["sj-parallel", "demo"] + ([] if data == "cifar10" else ["--data", data])
    for name, value in options.items():
        flag = flags.get(name) or (DEMO_OPTIONS.get(data, {}).get(name, (None,))[0])
        if flag is None or value is None:
            continue
        if name == "learned_T":
            parts += ["--learned-T", *map(str, value)] if value else ["--no-learned"]
        elif isinstance(value, (list, tuple, set)):
            parts += [flag, *map(str, sorted(value) if isinstance(value, set) else value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _load() -> str:
    """The machine's 1-minute load average, which the times depend on ("" where unknown)."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} at the start"
    except (OSError, AttributeError):
        return ""


def _provenance(t_start: float, load: str, command: str) -> list:
    """Footer lines of table.md: where, with what and how the table was made."""
    import datetime
    from importlib import metadata

    from .. import __version__

    try:
        sj = metadata.version("spikingjelly")
    except metadata.PackageNotFoundError:
        sj = "unknown"
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return [f"Machine: {machine_label('cpu')}" + (f", {load}" if load else "") + f"; torch {torch.__version__}, "
            f"SpikingJelly {sj}, sj-parallel-conversion {__version__}; {day} (UTC); "
            f"{time.perf_counter() - t_start:.0f} s in all.",
            f"Command: {command}"]


def _logger(t_start: float):
    def log(msg: str) -> None:
        print(f"[demo {time.perf_counter() - t_start:5.1f}s] {msg}", flush=True)
    return log


def _run_cifar10(out_dir: str, Ts: list, test_images: int, calib_images: int, baselines: list, learned_T: set,
                 learned: LearnedCalibration, repeats: int, progress: bool, command: str) -> ComparisonTable:
    t_start, load = time.perf_counter(), _load()
    log = _logger(t_start)
    os.makedirs(out_dir, exist_ok=True)
    ann, meta = models.load_checkpoint(str(CIFAR_CHECKPOINT), map_location="cpu")
    ann.eval()
    calib_set, test_set = (data.cifar10_subset("train", limit=calib_images),
                            data.cifar10_subset("test", limit=test_images))
    calib = DataLoader(calib_set, batch_size=128)
    test = DataLoader(test_set, batch_size=TEST_BATCH)  # several batches: several timings, for a median
    learn_set = data.cifar10_subset("train", limit=learned.max_images) if learned_T else None
    log(f"ResNet-20 (ReLU, {100 * meta['test_accuracy']:.2f} % on the full test set); shipped CIFAR-10 "
        f"subset: {len(calib_set)} calibration and {len(test_set)} test images"
        + (f", {len(learn_set)} images for learned calibration" if learned_T else ""))
    title = (f"CIFAR-10 ResNet-20 (ReLU), {len(test_set)} test images, {len(calib_set)} calibration images"
             + (f" ({len(learn_set)} for learned calibration)" if learned_T else ""))
    table = ComparisonTable(title=title, timed_calls=repeats * count_batches(test), machine=machine_label("cpu"))
    ev = dict(progress=False, repeats=repeats)

    # The parallel recipe, converted per T (each neuron reads the mean of its T input steps).
    # Rows are count-domain evaluations: the spike-level run's time mean at one ANN forward's cost.
    rows = {"parallel-ema": [], "parallel-learned": []}
    describe = {}
    for T in Ts:
        t0 = time.perf_counter()
        recipe = ParallelConversionRecipe(T, calib, progress=False, method="ema")
        describe["ema"] = f"ParallelConversionRecipe(T, method={recipe.method!r})"
        snn = ParallelConverter(recipe, device="cpu").convert(copy.deepcopy(ann))
        conv = time.perf_counter() - t0
        acc, n, sec = evaluate(predictor(snn, T, count_domain=True), test, **ev)
        rows["parallel-ema"].append(ComparisonRow("parallel-ema", T, acc, n, conv, sec,
                                                  calibration=calibration_label(snn)))
        log(f"parallel T={T}, Algorithm 1: {100 * acc:.1f} % ({conv:.1f} s to convert)")
        if T not in learned_T:
            continue
        # Learned calibration fits every neuron's thresholds and shift to the ANN's outputs; it
        # gains most at small T, where Algorithm 1 loses most (docs: calibration).
        t0 = time.perf_counter()
        recipe = ParallelConversionRecipe(T, DataLoader(learn_set, batch_size=128), "learned", progress=False,
                                          calibration=CalibrationSettings(learned=learned))
        describe["learned"] = (f"ParallelConversionRecipe(T, method={recipe.method!r}, calibration=CalibrationSettings("
                               f"learned=LearnedCalibration(steps={learned.steps}, eval_every={learned.eval_every}, "
                               f"max_images={learned.max_images})))")
        snn = ParallelConverter(recipe, device="cpu").convert(copy.deepcopy(ann))
        conv = time.perf_counter() - t0
        acc, n, sec = evaluate(predictor(snn, T, count_domain=True), test, **ev)
        history = snn.calibration_report.learned
        held_out = snn.calibration_report.held_out_images
        rows["parallel-learned"].append(ComparisonRow(
            "parallel-learned", T, acc, n, conv, sec,
            f"ok ({history['steps_run']} steps, kept step {history['kept_step']})", calibration=calibration_label(snn)))
        log(f"parallel T={T}, learned calibration: {100 * acc:.1f} % ({conv:.1f} s to convert, "
            f"{history['steps_run']} steps)")
    table.rows.extend(rows["parallel-ema"] + rows["parallel-learned"])

    # SpikingJelly's IF converters: one run of the largest T gives every smaller T.
    for m in baselines:
        t0 = time.perf_counter()
        snn = convert_builtin(m, ann, calib, device="cpu", progress=progress)
        conv = time.perf_counter() - t0
        results = evaluate_steps(snn, test, Ts, **ev)
        for T in Ts:
            acc, n, sec = results[T]
            table.rows.append(ComparisonRow(m, T, acc, n, conv, sec,
                                            "ok" if T == Ts[-1] else f"ok (from the T={Ts[-1]} run)",
                                            calibration=BUILTIN_CALIBRATION[m]))
        log(f"{m}: " + ", ".join(f"T={T} {100 * results[T][0]:.1f} %" for T in Ts))
    # Timed last (listed first, below): a process's first timings pay for fresh memory, which
    # made the ANN look slower than the count domain that costs about as much.
    acc, n, sec = evaluate(ann, test, **ev)
    table.rows.append(ComparisonRow("ann", None, acc, n, 0.0, sec))
    plan = {key: i for i, key in enumerate(planned_rows(Ts, learned_T, baselines))}
    table.rows.sort(key=lambda r: plan[(r.method, r.T)])

    def builtin(m):
        options = BUILTIN[m]
        if options is None:
            return "LocalThresholdBalancingRecipe()"
        return "RateCodingRecipe(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"

    notes = [f"ANN: the shipped ResNet-20 (ReLU, option-B shortcuts; {100 * meta['test_accuracy']:.2f} % on all "
             "10,000 CIFAR-10 test images).",
             f"Parallel rows, evaluated in the count domain: {describe['ema']} (Algorithm 1) on the "
             f"{len(calib_set)} calibration images at every T"
             + (f"; {describe['learned']} on {len(learn_set)} training images ({held_out} of them held out to steer "
                f"the fit) at T = {', '.join(map(str, sorted(learned_T)))}" if learned_T else "") + ".",
             *(f"SJ rows: SpikingJelly's {builtin(m)} on the same {len(calib_set)} calibration images"
               + (f"; its rows at T < {Ts[-1]} come from the cumulative output of one {Ts[-1]}-step run, and their "
                  f"times are that run's scaled by T / {Ts[-1]} (an IF network's cost is linear in T)"
                  if len(Ts) > 1 else "") + "." for m in baselines),
             f"Times: {len(test_set)} test images times the median per-image time of {table.timed_calls} timed calls "
             f"(test batches of {TEST_BATCH}, after one warm-up call; the ANN is timed last, once the allocator has "
             "settled, as a process's first timings pay for fresh memory). Parallel rows run in the count domain "
             "(one pass, no spikes); the SJ rows are spike-level IF runs of T steps."]
    return _finish(table, out_dir, log, notes + _provenance(t_start, load, command))


def _finish(table: ComparisonTable, out_dir: str, log, notes: Sequence[str] = ()) -> ComparisonTable:
    """Print the table and its notes, write table.md (both), table.json and the plot."""
    text = table.to_text() + ("\n\n" + "\n".join(notes) if notes else "")
    print()
    print(text)
    print()
    table.to_json(os.path.join(out_dir, "table.json"))
    write_text(os.path.join(out_dir, "table.md"), text + "\n")
    plot = table.plot(os.path.join(out_dir, "accuracy_speed.png"))
    log(f"wrote {os.path.join(out_dir, 'table.md')}, table.json and the plot {plot}")
    return table


def _run_digits(out_dir: str, T_list: list, epochs: int, seed: int, progress: bool, L: int,
                repeats: int, command: str) -> ComparisonTable:
    """Train two tiny CNNs on 8x8 digits, convert them three ways, compare."""
    t_start, load = time.perf_counter(), _load()
    log = _logger(t_start)
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    train_set, test_set = data.digits("train"), data.digits("test")
    train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    calib = DataLoader(train_set, batch_size=128)
    test = DataLoader(test_set, batch_size=100)  # 4 batches: 4 timings per evaluation, for a median

    log(f"digits: {len(train_set)} training and {len(test_set)} test images of 8x8 pixels")
    qcfs_ann = models.build_model("digits_cnn", num_classes=10, in_channels=1, act="qcfs", L=L, theta=2.0)
    train_classifier(qcfs_ann, train, epochs, lr=0.05, progress=progress)
    relu_ann = models.build_model("digits_cnn", num_classes=10, in_channels=1, act="relu")
    train_classifier(relu_ann, train, epochs, lr=0.05, progress=progress)
    log(f"trained a QCFS (L={L}) and a ReLU CNN for {epochs} epochs each")

    # 1. QCFS, T == L: lossless.
    snn = ParallelConverter("parallel", T=L, progress=False).convert(qcfs_ann)
    x = torch.cat([b[0] for b in test])
    with torch.no_grad():
        ann_pred = qcfs_ann(x).argmax(1)
    snn_pred = spike_inference(snn, x).mean(0).argmax(1)
    diff = int((ann_pred != snn_pred).sum())
    log(f"QCFS ANN -> parallel SNN at T = L = {L}: {diff} of {len(x)} test predictions differ from the ANN")
    table = ComparisonTable(title=f"8x8 digits, {len(test_set)} test images",
                            timed_calls=repeats * count_batches(test), machine=machine_label("cpu"))
    acc, n, sec = evaluate(qcfs_ann, test, progress=False, repeats=repeats)
    table.rows.append(ComparisonRow("qcfs-ann", None, acc, n, 0.0, sec))
    acc, n, sec = evaluate(lambda b: spike_inference(snn, b).mean(0), test, progress=False, repeats=repeats)
    table.rows.append(ComparisonRow("qcfs-parallel", L, acc, n, 0.0, sec, calibration=calibration_label(snn)))

    # 2 + 3. ReLU network: training-free parallel conversion vs SpikingJelly's IF converters.
    relu_table = compare_converters(relu_ann, calib, test, T_list, progress=False,
                                    methods=("ann", "parallel", "parallel-count", "rate-cw-max", "rate-cw-99.9%",
                                             "rate-max", "rate-99.9%", "ltb"), repeats=repeats)
    table.rows.extend(relu_table.rows)
    log("converted the ReLU CNN with the parallel recipe and with SpikingJelly's RateCoding and LTB recipes")
    return _finish(table, out_dir, log, _provenance(t_start, load, command))
