"""sj-parallel (also python -m sj_parallel_conversion): demo, convert, evaluate, compare, stats, search-t.

Error contract: errors a user can cause (missing, corrupt, empty or pickle-only files, directories
given as files, unknown models, mismatched weights, a model that does not accept the data, bad T,
options that do not apply together, unwritable outputs) print one line ``sj-parallel: error: ...``
naming the file or argument and exit with status 2; output paths are checked before any loading
or conversion. Ctrl-C prints one line and exits with 130; every file is written to a temporary
file and renamed, so an interrupted or failed write leaves no partial file and keeps the previous
one. Any other exception is a bug: one line that says so, exit status 1. ``--debug`` shows the
traceback instead of the line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional, Tuple

import torch

from ..fileio import write_json

__all__ = ["main", "build_parser"]

class CLIError(Exception):
    """An error whose message is shown to the user as one line."""


#: Exceptions that describe the user's input or machine, shown as one line with exit status 2:
#: the CLI's own checks, ``ValueError`` (the package's validation raises it or a subclass such as
#: ``GraphConversionError`` and ``FileError``; so does torch.fx for a model it cannot trace) and
#: ``OSError`` (files, folders, permissions, full disks). Anything else is a bug and exits with 1.
USER_ERRORS = (CLIError, ValueError, OSError)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {v}")
    return v


class LayerT(dict):
    """Per-layer time steps read from a ``--T FILE`` (``site name -> T``); ``source`` is the file."""

    source = ""


class _TFile(str):
    """A ``--T`` value that names a file; read (and checked) by :func:`_read_T_files`."""


def _T_arg(text: str):
    """``--T`` of convert/evaluate/stats: a positive integer, or a JSON file of per-layer T."""
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        if text.lower().endswith(".json") or os.path.exists(text):
            return _TFile(text)
        raise argparse.ArgumentTypeError(f"expected a positive integer or a JSON file of per-layer T "
                                         f"(as 'search-t --json' writes), got {text!r}") from None


def _calib_images(args) -> int:
    """--calib-images, or its default where the arguments have not been through :func:`_check_args`."""
    return getattr(args, "calib_images", None) or CALIB_IMAGES


def _T_max(T) -> int:
    """The most steps any layer of a (uniform or per-layer) ``T`` runs."""
    return max(T.values()) if isinstance(T, dict) else T


def _T_label(T) -> str:
    if not isinstance(T, dict):
        return f"T={T}"
    src = f" from {T.source}" if getattr(T, "source", "") else ""
    return f"per-layer T{src} ({min(T.values())}..{max(T.values())}, mean {sum(T.values()) / len(T):.2f})"


#: Bounded default of --calib-images: about 1,000 images calibrate as well as an epoch (the
#: calibration page's measurements) at a fraction of its time.
CALIB_IMAGES = 1024
#: Seed of the one shuffle of the training images the calibration images are the first of.
CALIBRATION_ORDER_SEED = 0
#: Settings of a run that its JSON file records beside the versions (as the options resolved them).
RUN_SETTINGS = ("method", "alpha", "calib_images", "seed", "learn_steps", "data", "limit", "batch_size", "device",
                "mode", "T")
#: Defaults of the options whose value must be told apart from "not given" (they are refused
#: where they would be ignored); :func:`_check_args` fills them in after its checks.
DEFAULTS = {"method": "auto", "alpha": 0.99, "calib_images": CALIB_IMAGES}


def _add_data_args(p: argparse.ArgumentParser, test_images: bool = True) -> None:
    """Data options; ``test_images=False`` for subcommands that never read the test split (no --limit)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default="npz", choices=["npz", "subset", "cifar10", "cifar100", "imagefolder", "digits"],
                   help="npz (default): the project's CIFAR-10 arrays (SJPC_CIFAR10_DIR or --data-root); subset: "
                        "the CIFAR-10 subset shipped in the package (1,000 test, 1,024 training images); "
                        "cifar10/cifar100: torchvision datasets; imagefolder: an ImageNet-style folder; "
                        "digits: scikit-learn 8x8")
    g.add_argument("--data-root", default=None,
                   help="dataset folder for npz (default: SJPC_CIFAR10_DIR), cifar10/cifar100 and imagefolder "
                        "(required there); refused with subset and digits, which ship with the packages")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download CIFAR (--data cifar10/cifar100 only; never by default)")
    g.add_argument("--batch-size", type=_positive_int, default=128, help="images per batch (default 128)")
    if test_images:
        g.add_argument("--limit", type=_positive_int, default=None,
                       help="evaluate on at most this many test images (default: the whole test split)")
    g.add_argument("--calib-images", type=_positive_int, default=None, metavar="N",
                   help=f"calibrate on at most N training images (default {CALIB_IMAGES}), the first N of one "
                        "shuffle seeded with 0, the same for every T and method")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to run on (default: cuda when available, else cpu)")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="input normalisation mean per channel of the built-in datasets (default: the dataset's "
                        "usual one); give with --std, e.g. for a model trained with other preprocessing")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="normalisation std per channel (default: the dataset's usual one)")


def _add_source_args(p: argparse.ArgumentParser, snn: bool = False) -> None:
    """Where the network comes from: the project's checkpoint, any model + weights, or an SNN file."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="ANN checkpoint written by save_checkpoint / train_cifar.py (a plain "
                                        "state_dict goes with --model NAME --weights FILE)")
    g.add_argument("--model", metavar="NAME",
                   help="any model, with --weights: a zoo name (resnet20, ...), torchvision:NAME or MODULE:CALLABLE "
                        "(a factory importable from PYTHONPATH or the working directory)")
    if snn:
        g.add_argument("--snn", help="SNN file written by 'convert' / save_snn (its own T, already calibrated)")
    p.add_argument("--weights", metavar="FILE",
                   help="state_dict file, required with --model (also wrapped under state_dict/model/"
                        "model_state_dict; 'module.' prefixes are stripped)")
    p.add_argument("--num-classes", type=_positive_int, default=None,
                   help="passed to the --model factory as num_classes (default: the factory's own)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--method", choices=["auto", "distill", "learned", "mse", "ema", "paper", "moment"], default=None,
                   help="auto (default): of Algorithm 1, mse and distill, keep the one agreeing best with the ANN on "
                        "held-out calibration images and blends of them among those agreeing clearly more often than no calibration "
                        "there (sign test), else none (distill is skipped where a cheaper one already "
                        "agrees on 99 %%); distill: learn every neuron's per-channel thresholds and shift and the "
                        "network's weights from the ANN's outputs; learned: the neurons' parameters only; mse: "
                        "thresholds chosen for T levels by squared error, then Algorithm 1; ema: Algorithm 1 "
                        "(bias-corrected averages); paper: Algorithm 1 with the paper's settings (alpha 0.99, no "
                        "bias correction, convolution sites); moment: moment matching")
    from ..learned import DistillCalibration, LearnedCalibration
    g.add_argument("--learn-steps", type=_positive_int, default=None,
                   help="the fit of --method auto, distill or learned (compare: also parallel-learned): "
                        f"distill: this many optimisation steps per block (default {DistillCalibration.steps}); "
                        f"learned: at most this many steps (default {LearnedCalibration.steps}; plateaus of the "
                        "held-out loss usually end it sooner)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the table as JSON (default: none)")
    p.add_argument("--csv", default=None, help="also write the table as CSV (default: none)")
    p.add_argument("--plot", default=None, help="also write a PNG plot (accuracy vs T; compare: and throughput "
                                                "vs T from the median of the timed runs, labelled with the machine; "
                                                "default: none)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sj-parallel", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: convert the shipped CIFAR-10 ResNet-20 with the parallel "
                                    "recipe and SpikingJelly's converters, print the table, write the plot",
                       description="Convert the shipped CIFAR-10 ResNet-20 (ReLU) at several T with the parallel "
                                   "recipe and with SpikingJelly's RateCodingRecipe (by default its strongest "
                                   "setting: channel-wise thresholds, half-threshold start), evaluate on the shipped "
                                   "CIFAR-10 test subset, print the table and write table.md, table.json and "
                                   "accuracy_speed.png. No download, no SJPC_CIFAR10_DIR. --data digits runs the "
                                   "small 8x8-digits demo instead (trains two tiny CNNs).")
    d.add_argument("--data", choices=["cifar10", "digits"], default="cifar10",
                   help="cifar10 (default): the shipped ResNet-20 and CIFAR-10 subset; digits: tiny CNNs "
                        "trained on scikit-learn's 8x8 digits")
    d.add_argument("--out", default="runs/demo", help="folder for table.md, table.json and the plot "
                                                      "(default runs/demo, relative to the current folder)")
    d.add_argument("--T", type=_positive_int, nargs="+", default=None,
                   help="time steps to convert for (default 4 8 16 32; digits: 2 4 8 16 32)")
    from .demo import DEMO_OPTIONS, REPEATS as _DEMO_REPEATS
    from ..learned import LearnedCalibration
    cifar, digits = DEMO_OPTIONS["cifar10"], DEMO_OPTIONS["digits"]
    d.add_argument("--images", type=_positive_int, default=None,
                   help=f"cifar10: test images to evaluate on, at most 1000 (default {cifar['test_images'][1]})")
    d.add_argument("--calib-images", type=_positive_int, default=None, metavar="N",
                   help="cifar10: shipped training images that Algorithm 1 and SpikingJelly's converters calibrate "
                        f"on, 2 to 1024 (default {cifar['calib_images'][1]})")
    from .compare import BUILTIN
    d.add_argument("--baselines", nargs="+", choices=list(BUILTIN), default=None,
                   help="cifar10: SpikingJelly converters to compare with, each evaluated at every T from one "
                        f"IF run of the largest T (default {' '.join(cifar['baselines'][1]).replace('%', '%%')}: RateCodingRecipe's "
                        "strongest setting)")
    learned = d.add_mutually_exclusive_group()
    learned.add_argument("--learned-T", type=_positive_int, nargs="*", default=None,
                         help="cifar10: the T that also get a learned-calibration row (default 4; a few minutes "
                              "on 2 CPU cores per T); with no value, none")
    learned.add_argument("--no-learned", action="store_const", const=True, default=None,
                         help="cifar10: no learned-calibration row (same as --learned-T with no value)")
    d.add_argument("--learn-steps", type=_positive_int, default=None,
                   help=f"cifar10: optimisation steps of each learned calibration (default {cifar['learn_steps'][1]})")
    d.add_argument("--learn-images", type=_positive_int, default=None,
                   help="cifar10: shipped training images the learned calibration uses (a share "
                        f"{LearnedCalibration.holdout:g} of them held out to steer the fit), 4 to 1024 "
                        f"(default {cifar['learn_images'][1]})")
    d.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed runs of every test batch; times are the median per-image time of all timed "
                        "batches (default %d: the 4 batches of the 256 default test images)" % _DEMO_REPEATS)
    d.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"digits: training epochs of each tiny CNN (default {digits['epochs'][1]})")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")

    c = sub.add_parser("convert", help="convert an ANN checkpoint into a parallel SNN file")
    _add_source_args(c)
    c.add_argument("--T", type=_T_arg, required=True, metavar="T|FILE",
                   help="time steps of the converted network (required): an integer, or a JSON file of per-layer "
                        "T such as 'search-t --json' writes")
    c.add_argument("--out", required=True, help="output file for the converted SNN (required)")
    c.add_argument("--calibrate", choices=["auto", "yes", "no"], default="auto",
                   help="calibrate DA-QCFS: auto (default) where the conversion case needs it (ReLU source, "
                        "or QCFS at T != L), yes always, no never")
    c.add_argument("--alpha", type=float, default=None,
                   help="momentum of Algorithm 1's moving average, in [0, 1) (default 0.99, the paper's); used by "
                        "--method ema and mse and by the Algorithm-1 start of auto, distill and learned; refused "
                        "with paper (fixed 0.99) and moment")
    _add_method_args(c)
    _add_data_args(c, test_images=False)
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")

    e = sub.add_parser("evaluate", help="accuracy at a list of T, spike-level or count-domain")
    _add_source_args(e, snn=True)
    e.add_argument("--T", type=_T_arg, nargs="+", default=None, metavar="T|FILE",
                   help="time steps to convert for and evaluate, each an integer or a JSON file of per-layer T "
                        "('search-t --json'); required with --checkpoint / --model; with --snn only the file's "
                        "own T (default)")
    e.add_argument("--mode", choices=["spike", "count"], default="count",
                   help="count (default): count-domain evaluation, one pass; spike: a spike-level run")
    _add_method_args(e)
    _add_data_args(e)
    _add_output_args(e)

    m = sub.add_parser("compare", help="table against SpikingJelly's built-in converters")
    _add_source_args(m)
    m.add_argument("--T", type=_positive_int, nargs="+", default=[4, 8, 16, 32],
                   help="time steps to compare at (default 4 8 16 32)")
    from .compare import METHODS
    m.add_argument("--methods", nargs="+", choices=list(METHODS), default=[x for x in METHODS if x != "parallel-learned"],
                   help="methods to compare (default all but parallel-learned, which adds a learned fit at every T); rate-cw-*: SpikingJelly's RateCodingRecipe with "
                        "channel_wise=True, half_threshold=True, its strongest setting; rate-*: its defaults; "
                        "ltb: LocalThresholdBalancingRecipe")
    m.add_argument("--title", default=None,
                   help="title of the table, its JSON and the plot (default: the model, --data and the number of "
                        "test images)")
    m.add_argument("--repeats", type=_positive_int, default=3,
                   help="timed runs of every test batch; times are the median per-image time of all timed "
                        "runs (default 3; with 1 and a single batch the plot leaves throughput out)")
    _add_method_args(m)
    _add_data_args(m)
    _add_output_args(m)

    st = sub.add_parser("stats", help="per-layer firing rates, SOPs and an energy estimate of a converted model")
    _add_source_args(st, snn=True)
    st.add_argument("--T", type=_T_arg, default=None, metavar="T|FILE",
                    help="time steps to convert for, an integer or a JSON file of per-layer T ('search-t --json'); "
                         "required with --checkpoint / --model; with --snn only the file's own T (default)")
    _add_method_args(st)
    _add_data_args(st, test_images=False)  # --images says how many test images run
    st.add_argument("--images", type=_positive_int, default=256,
                    help="the first this many test images run at spike level (default 256)")
    st.add_argument("--json", default=None, help="also write the statistics as JSON (default: none)")
    st.add_argument("--plot", default=None, help="also write a per-layer PNG plot (default: none)")
    st.add_argument("--no-progress", action="store_true", help="hide progress bars")

    lt = sub.add_parser("search-t", help="search per-layer time steps for an accuracy budget")
    _add_source_args(lt)
    lt.add_argument("--T-max", type=_positive_int, default=16,
                    help="uniform time steps the search starts from and never exceeds (default 16)")
    lt.add_argument("--candidates", type=_positive_int, nargs="+", default=[1, 2, 4, 8],
                    help="smaller time steps tried per layer (default 1 2 4 8)")
    lt.add_argument("--max-loss", type=float, default=0.01,
                    help="allowed accuracy loss against uniform --T-max, a fraction (default 0.01: one point)")
    lt.add_argument("--search-batches", type=_positive_int, default=4,
                    help="batches of training images held out (never calibrated on) to score candidates "
                         "(default 4, of --batch-size images each)")
    lt.add_argument("--seed", type=int, default=0, help="seed of the search/calibration split (default 0)")
    _add_data_args(lt, test_images=False)
    lt.add_argument("--json", default=None,
                    help="also write the result as JSON (default: none); its per-layer T is what convert, evaluate "
                         "and stats take as --T FILE")
    lt.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


# ---------------------------------------------------------------------------------------------
def _datasets(args, need_train: bool):
    from . import data

    root = args.data_root
    norm = {"mean": args.mean, "std": args.std}
    try:
        if args.data == "npz":
            test = data.cifar10_npz("test", root=root, **norm)
            train = data.cifar10_npz("train", root=root, **norm) if need_train else None
        elif args.data == "subset":
            test = data.cifar10_subset("test", **norm)
            train = data.cifar10_subset("train", **norm) if need_train else None
        elif args.data == "digits":
            test = data.digits("test")
            train = data.digits("train") if need_train else None
        else:
            if root is None:
                raise CLIError(f"--data {args.data} needs --data-root")
            test = data.torchvision_dataset(args.data, root, "test", download=args.download, **norm)
            train = (data.torchvision_dataset(args.data, root, "train", download=args.download, **norm)
                     if need_train else None)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from exc
    return train, test


def _shard(ds):
    from torch.utils.data import Subset

    from .. import distributed

    return Subset(ds, list(distributed.shard_indices(len(ds)))) if distributed.is_distributed() else ds


def _loaders(args, need_train: bool):
    from . import data

    train, test = _datasets(args, need_train)
    limit = getattr(args, "limit", None)
    if limit is not None and len(test) > limit:
        from torch.utils.data import Subset

        test = Subset(test, range(limit))
    if limit is not None:
        args.limit = len(test)  # what the result files record: the images there were
    test = _shard(test)
    test_loader = data.make_loader(test, args.batch_size)
    calib_loader = None
    if train is not None:
        # One seeded shuffle, then a fixed order: every T and every method of one run calibrates
        # on the same images (mixed classes), and a rerun gives the same networks. Shards are cut
        # from those images, so torchrun calibrates on the images a single process would.
        from torch.utils.data import Subset

        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(CALIBRATION_ORDER_SEED)).tolist()
        chosen = order[:_calib_images(args)]
        args.calib_images = len(chosen)  # what the result files record: the images there were
        calib_loader = data.make_loader(_shard(Subset(train, chosen)), args.batch_size)
    return calib_loader, test_loader


def _load_ann(args):
    """The ANN from --checkpoint, or --model built and loaded from --weights; ``(model, meta)``."""
    from . import models

    if args.checkpoint is not None:
        try:
            model, meta = models.load_checkpoint(args.checkpoint, map_location="cpu")
        except ValueError as exc:
            if _is_state_dict(args.checkpoint):
                raise CLIError(f"--checkpoint {args.checkpoint}: a plain state_dict (weights without the model's "
                               f"name), not a checkpoint of save_checkpoint; load it with --model NAME --weights "
                               f"{args.checkpoint} (NAME: a zoo name such as resnet20, torchvision:NAME or "
                               "MODULE:CALLABLE)") from exc
            raise
    else:
        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        try:
            model = models.load_user_model(args.model, args.weights, **kwargs)
        except ValueError as exc:
            hint = _num_classes_hint(args.model, args.weights, kwargs)
            if not hint:
                raise
            raise CLIError(f"{_one_line(exc)}; {hint}") from exc
        meta = {"name": args.model, "weights": os.path.abspath(args.weights), **kwargs}
    return model.to(args.device).eval(), meta


def _check_plot_format(path: str) -> None:
    """--plot's extension names a format matplotlib writes (it picks the format by extension)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in formats:
        what = f"'.{ext}' is not a format matplotlib writes" if ext else "it has no extension to name the format"
        raise CLIError(f"--plot {path!r}: {what}; use one of {', '.join('.' + f for f in formats)}")


def _is_state_dict(path: str) -> bool:
    """Does ``path`` hold a state_dict (plain or wrapped) without the model name a checkpoint has?"""
    from ..fileio import load_tensor_file
    from .models import extract_state_dict

    try:
        blob = load_tensor_file(path, what="checkpoint")
        extract_state_dict(blob)
    except (ValueError, OSError):
        return False
    return not (isinstance(blob, dict) and "name" in blob)


def _num_classes_hint(spec: str, weights: str, kwargs: dict) -> str:
    """``"... add --num-classes N"`` where the weights' last linear layer has ``N`` outputs and
    the model built from ``spec`` another number; ``""`` otherwise."""
    from ..fileio import load_tensor_file
    from .models import build_user_model, extract_state_dict

    try:
        model = build_user_model(spec, **kwargs)
        state = extract_state_dict(load_tensor_file(weights, what="weights file"), model=model)
    except Exception:  # the hint is optional: the original error is reported either way
        return ""
    heads = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not heads:
        return ""
    key = f"{heads[-1]}.weight"
    mine, theirs = model.state_dict().get(key), state.get(key)
    if not (torch.is_tensor(mine) and torch.is_tensor(theirs) and mine.dim() == theirs.dim() == 2):
        return ""
    if mine.shape[1] != theirs.shape[1] or mine.shape[0] == theirs.shape[0]:
        return ""
    return (f"the weights' output layer {heads[-1]} has {theirs.shape[0]} outputs where the model built has "
            f"{mine.shape[0]}: add --num-classes {theirs.shape[0]}")


def _recipe(args, T, calib_loader, calibrate=None):
    from .. import distributed
    from ..recipe import ParallelConversionRecipe, with_calibration

    reducer = distributed.allreduce_reducer() if distributed.is_distributed() else None
    return ParallelConversionRecipe(T, calib_loader, progress=not args.no_progress, reducer=reducer,
                                    **with_calibration(_method_options(args), calibrate=calibrate))


def _method_options(args) -> dict:
    """The recipe's ``method`` and ``calibration`` from the command's options."""
    from ..learned import DistillCalibration, LearnedCalibration
    from ..recipe import CalibrationSettings

    fits = {}
    if getattr(args, "learn_steps", None) is not None:
        steps = args.learn_steps
        fits = dict(learned=LearnedCalibration(steps=steps), distill=DistillCalibration(steps=steps))
    return {"method": getattr(args, "method", None) or DEFAULTS["method"],
            "calibration": CalibrationSettings(alpha=getattr(args, "alpha", DEFAULTS["alpha"]), **fits)}


#: Settings of the calibration a run makes; a saved network (--snn) was calibrated when it was
#: converted, so its run records none of them.
CALIBRATION_SETTINGS = ("method", "alpha", "calib_images", "seed", "learn_steps")


def _run_settings(args) -> dict:
    """What a result file records of its run: the command line and the settings the options
    resolved to (the counts of images actually used, the normalisation, and for a run that
    calibrates, alpha and the seed of the calibration images' order)."""
    import shlex

    def plain(v):  # JSON as it is where it can be (numbers, lists), else its text (a T file)
        return v if isinstance(v, (int, float, str, bool)) or (
            isinstance(v, list) and all(isinstance(x, (int, float, str)) for x in v)) else str(v)

    run = {"command": " ".join(["sj-parallel"] + [shlex.quote(a) for a in getattr(args, "argv", [])]),
           **{k: plain(v) for k, v in vars(args).items() if k in RUN_SETTINGS and v is not None}}
    for name in ("mean", "std"):
        value = getattr(args, name, None)
        run[name] = plain(value) if value is not None else f"the default of --data {getattr(args, 'data', '')}".strip()
    if getattr(args, "snn", None):
        for name in CALIBRATION_SETTINGS:
            run.pop(name, None)
        run["snn"] = str(args.snn)
    elif "method" in run:
        run.setdefault("alpha", DEFAULTS["alpha"])
        run.setdefault("seed", CALIBRATION_ORDER_SEED)
    return run


def _is_main_process() -> bool:
    from .. import distributed

    return distributed.rank() == 0


def _finish_table(table, args) -> None:
    if not _is_main_process():
        return
    from .compare import machine_label

    table.machine = table.machine or machine_label(getattr(args, "device", "cpu"))
    table.run = _run_settings(args)
    print(table.to_text())
    if args.json:
        table.to_json(args.json)
        print(f"wrote {args.json}")
    if args.csv:
        table.to_csv(args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        table.plot(args.plot)
        print(f"wrote {args.plot}")


def cmd_demo(args) -> int:
    from .demo import REPEATS, run_demo

    # Options not given stay None: run_demo fills in its defaults and refuses those of the other demo.
    learned_T = () if args.no_learned else args.learned_T
    run_demo(out_dir=args.out, data=args.data, T_list=args.T, test_images=args.images,
             calib_images=args.calib_images, baselines=args.baselines, learned_T=learned_T,
             learn_steps=args.learn_steps, learn_images=args.learn_images,
             repeats=args.repeats or REPEATS, epochs=args.epochs, progress=not args.no_progress)
    return 0


def _model_label(meta: dict) -> str:
    """``name (activation)`` for checkpoints, which record the activation; the name alone for
    --model NAME --weights FILE and for SNN files saved without a model name."""
    name = meta.get("name") or "model"
    return f"{name} ({meta['act']})" if meta.get("act") else name


def _check_fits(model, loader, args, what: str, snn_T=None) -> None:
    """Run ``model`` on one image of ``loader`` so that a model built for other inputs fails here,
    as a user error naming --data, before any calibration; refuse labels beyond the model's
    outputs, and time steps whose spike-level runs cannot fit in memory (:func:`_check_memory`).

    A converted network (``snn_T``) runs first in the count domain (one pass, no time steps); then,
    where one image fits in memory at its ``T``, at spike level."""
    from ..calibration import extract_input
    from ..inference import count_domain_model, predictor

    batch = next(iter(loader), None)
    if batch is None:
        raise CLIError(f"--data {args.data}: the data set holds no images")
    x = extract_input(batch)[:1].to(args.device)
    # torch reports shape and dtype mismatches as RuntimeError; a --model MODULE:CALLABLE forward is
    # the user's own code, so anything it raises is about that model.
    spec = getattr(args, "model", None) if snn_T is None else None
    caught = Exception if spec and ":" in spec and not spec.startswith("torchvision:") else RuntimeError
    runs = [(model, None)]
    if snn_T is not None:
        try:
            runs = [(count_domain_model(model), None)]
        except ValueError:  # no parallel neurons: only a spike-level run can say anything
            runs = []
        if not runs or _spike_bytes(runs[0][0], x, snn_T, 1, probe=True) <= _memory_bytes(args.device):
            runs.append((predictor(model, snn_T), snn_T))
    largest = 0
    for run, T in runs:
        try:
            with torch.no_grad():
                out, size = _largest_activation(run, x)
        except Exception as exc:  # memory first: an allocation failure says nothing about the data
            if _is_out_of_memory(exc):
                raise CLIError(f"{what}: out of memory running one image" + (f" at {_T_label(T)}" if T else "") +
                               f" on {args.device} ({_one_line(exc)}); lower --T") from exc
            if isinstance(exc, caught):
                raise CLIError(f"{what} does not accept --data {args.data} inputs (images of shape "
                               f"{tuple(x.shape[1:])}): {_one_line(exc)}") from exc
            raise
        largest = max(largest, size)
    _check_labels(out, loader, args, what)
    _check_memory(largest, x, args, what, snn_T, len(loader.dataset))


def _largest_activation(run, x: torch.Tensor):
    """``run(x)`` and the most values one image occupies in any module's output along the way."""
    sizes = [x[0].numel()]

    def record(module, inputs, output):
        if torch.is_tensor(output) and output.dim() > 0:
            sizes.append(output.numel() // max(1, len(x)) if output.shape[0] == len(x) else output.numel())

    modules = run.modules() if isinstance(run, torch.nn.Module) else ()
    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        out = run(x)
    finally:
        for h in hooks:
            h.remove()
    return out, max(sizes)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)))


def _check_labels(out, loader, args, what: str) -> None:
    """Labels the model cannot predict (beyond its outputs) are refused instead of scored as misses."""
    top = _max_label(loader.dataset)
    if top is None or not torch.is_tensor(out) or out.dim() != 2:
        return
    if top >= out.shape[1]:
        raise CLIError(f"--data {args.data}: labels go up to {top} but {what} has {out.shape[1]} outputs "
                       "(--num-classes, or data with the model's classes)")


def _max_label(ds) -> Optional[int]:
    """The largest label of a dataset, where it can be read without loading images."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(ds, Subset):
        top = _max_label(ds.dataset)
        return top  # a bound: the subset's own labels are no larger
    if isinstance(ds, TensorDataset) and len(ds.tensors) > 1 and ds.tensors[1].numel():
        return int(ds.tensors[1].max())
    targets = getattr(ds, "targets", None)
    if isinstance(targets, (list, torch.Tensor)) and len(targets):
        return int(max(targets)) if isinstance(targets, list) else int(targets.max())
    return None


def _memory_bytes(device: str) -> int:
    """The memory of ``device``: the GPU's own, else the machine's physical memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return 1 << 62


def _spike_bytes(model_or_size, x: torch.Tensor, T: int, images: int, probe: bool = False) -> int:
    """Lower estimate of a spike-level run's memory: the largest activation of one image, times
    ``T`` steps and ``images``, times 2 (a layer's input and output live together). ``probe``:
    measure the largest activation by running ``model_or_size`` once on ``x``."""
    if probe:
        with torch.no_grad():
            try:
                _, size = _largest_activation(model_or_size, x)
            except Exception:  # the probe run reports its own errors; no estimate here
                return 0
    else:
        size = model_or_size
    return 2 * _T_max(T) * images * size * x.element_size()


def _spike_runs(args, snn_T, available: int) -> List[Tuple[int, int]]:
    """``(T, images)`` of the spike-level batches the command will run on ``available`` images
    (for convert: what the written file needs for one image)."""
    cmd = args.command
    batch = min(args.batch_size, available)
    if cmd == "convert":
        return [(_T_max(args.T), 1)]
    if cmd == "evaluate" and args.mode == "spike":
        return [(_T_max(T), batch) for T in ([snn_T] if snn_T else args.T or [])]
    if cmd == "stats":
        return [(_T_max(snn_T or args.T), min(args.images, available))]
    if cmd == "compare":
        return [(max(args.T), batch)]
    return []


def _check_memory(size: int, x: torch.Tensor, args, what: str, snn_T, available: int) -> None:
    """Refuse, before any conversion, a T whose spike-level batch cannot fit in the device's memory."""
    limit = _memory_bytes(args.device)
    for T, images in _spike_runs(args, snn_T, available):
        need = _spike_bytes(size, x, T, images)
        if need > limit:
            per = "the converted network needs for one image" if args.command == "convert" else \
                f"one spike-level batch of {images} images needs"
            raise CLIError(f"{what} at T={T}: {per} at least {_gib(need)} (T x {images} images x {size} values of its largest "
                           f"layer x {x.element_size()} bytes x 2), more than the {_gib(limit)} of {args.device}; "
                           "lower --T" + ("" if args.command == "convert" else " or --batch-size"))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def cmd_convert(args) -> int:
    from ..recipe import ParallelConverter

    ann, meta = _load_ann(args)
    calib_loader, _ = _loaders(args, need_train=True)
    _check_fits(ann, calib_loader, args, _model_label(meta))
    calibrate = {"auto": None, "yes": True, "no": False}[args.calibrate]
    recipe = _recipe(args, args.T, calib_loader, calibrate)
    snn = ParallelConverter(recipe, device=args.device).convert(ann)
    if not _is_main_process():
        return 0
    from ..serialization import save_snn

    metadata = {"T": _T_max(args.T), "model": meta, "case": dataclasses.asdict(recipe.case),
                # evaluate/stats --snn normalise as the network was calibrated (None: the data's default)
                "normalisation": {"mean": args.mean, "std": args.std}}
    if isinstance(args.T, dict):
        metadata["layer_T"] = dict(args.T)
    save_snn(snn, args.out, metadata=metadata)
    print(f"converted {meta.get('name') or 'model'} ({recipe.case.source} source, "
          f"calibrated={recipe.case.calibrate}) at {_T_label(args.T)}: wrote {args.out}")
    return 0


def _read_snn(path: str, device: str):
    """A network saved by 'convert' / save_snn: ``(model, meta of its ANN, T)``."""
    from ..neuron import ParallelConversionNode
    from ..serialization import load_snn

    snn = load_snn(path, map_location=device)
    info = getattr(snn, "snn_metadata", None) or {}
    T = info.get("T")
    if not isinstance(T, int):
        # Saved from Python without metadata: the input steps a parallel network needs are its
        # neurons' own; with per-layer T the largest is what a spike-level run emits at most.
        ts = [m.T for m in snn.modules() if isinstance(m, ParallelConversionNode)]
        if not ts:
            raise CLIError(f"SNN file {path!r} holds no ParallelConversionNode and no T in its metadata")
        T = max(ts)
    layers = info.get("layer_T")
    if isinstance(layers, dict) and layers:  # converted from a per-layer --T FILE
        T = LayerT(layers)
    return snn, info.get("model", {}), T


def _adopt_normalisation(args, snn) -> None:
    """--mean/--std of an --snn run: the ones its file was converted with where the options
    leave them out; other values than the file's are refused rather than silently used."""
    norm = (getattr(snn, "snn_metadata", None) or {}).get("normalisation") or {}
    for name in ("mean", "std"):
        saved, given = norm.get(name), getattr(args, name)
        if saved is None:
            continue
        if given is None:
            setattr(args, name, list(saved))
        elif [float(v) for v in given] != [float(v) for v in saved]:
            raise CLIError(f"--{name} {' '.join(map(str, given))} differs from the {name} {args.snn} was converted "
                           f"with ({' '.join(map(str, saved))}); leave --{name} out to use the file's")


def cmd_evaluate(args) -> int:
    from .compare import ComparisonRow, ComparisonTable
    from ..distributed import distributed_evaluate as evaluate
    from ..inference import predictor
    from ..recipe import ParallelConverter

    ev = dict(device=args.device, progress=not args.no_progress)
    table = ComparisonTable(title=f"evaluate ({'count-domain' if args.mode == 'count' else 'spike-level'})")
    if args.snn:
        snn, meta, T = _read_snn(args.snn, args.device)
        _adopt_normalisation(args, snn)
        if args.T and args.T != [T]:
            raise CLIError(f"{args.snn} was converted for {_T_label(T)}; convert again for other T")
        _, test_loader = _loaders(args, need_train=False)
        _check_fits(snn, test_loader, args, f"SNN file {args.snn!r}", snn_T=T)
        pred = predictor(snn, T, count_domain=args.mode == "count")
        acc, n, sec = evaluate(pred, test_loader, **ev)
        table.rows.append(_parallel_row(args, T, acc, n, 0.0, sec, snn))
    else:
        if not args.T:
            raise CLIError("--T is required with --checkpoint / --model")
        ann, meta = _load_ann(args)
        calib_loader, test_loader = _loaders(args, need_train=True)
        _check_fits(ann, test_loader, args, _model_label(meta))
        acc, n, sec = evaluate(ann, test_loader, **ev)
        table.rows.append(ComparisonRow("ann", None, acc, n, 0.0, sec))
        for T in args.T:
            import copy
            import time

            t0 = time.perf_counter()
            snn = ParallelConverter(_recipe(args, T, calib_loader), device=args.device).convert(copy.deepcopy(ann))
            conv = time.perf_counter() - t0
            pred = predictor(snn, T, count_domain=args.mode == "count")
            acc, n, sec = evaluate(pred, test_loader, **ev)
            table.rows.append(_parallel_row(args, T, acc, n, conv, sec, snn))
    _finish_table(table, args)
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_converters

    ann, meta = _load_ann(args)
    # The ANN alone calibrates nothing: its table needs no training split on disk.
    calib_loader, test_loader = _loaders(args, need_train=set(args.methods) != {"ann"})
    _check_fits(ann, test_loader, args, _model_label(meta))
    title = args.title or (f"{_model_label(meta)} on {args.data}, "
                           f"{'all' if args.limit is None else args.limit} test images")
    table = compare_converters(ann, calib_loader, test_loader, args.T, methods=args.methods,
                               device=args.device,
                               progress=not args.no_progress, title=title, recipe_options=_method_options(args),
                               repeats=args.repeats)
    _finish_table(table, args)
    return 0


def _snn_for(args):
    """The converted model a command works on: from --snn, or the ANN converted at --T."""
    from ..recipe import ParallelConverter

    if args.snn:
        snn, meta, T = _read_snn(args.snn, args.device)
        _adopt_normalisation(args, snn)
        if args.T is not None and args.T != T:
            raise CLIError(f"--T {args.T}: {args.snn} was converted for {_T_label(T)}; convert again for another T")
        return snn, meta, T
    if not args.T:
        raise CLIError("--T is required with --checkpoint / --model")
    ann, meta = _load_ann(args)
    calib_loader, _ = _loaders(args, need_train=True)
    _check_fits(ann, calib_loader, args, _model_label(meta))
    snn = ParallelConverter(_recipe(args, args.T, calib_loader), device=args.device).convert(ann)
    return snn, meta, args.T


def _parallel_row(args, T, acc: float, n: int, conv: float, sec: float, snn):
    """evaluate's row of a parallel network. A per-layer T's row shows its largest T (what a
    spike-level run emits) under a method of its own, so that tables and plots do not put it in
    the series of uniform T, and its status names the layers' T."""
    from .compare import ComparisonRow, calibration_label

    method = "parallel" if args.mode == "spike" else "parallel-count"
    if isinstance(T, dict):
        return ComparisonRow(f"{method}-layer-T", _T_max(T), acc, n, conv, sec, f"ok ({_T_label(T)})",
                             calibration=calibration_label(snn))
    return ComparisonRow(method, T, acc, n, conv, sec, "ok", calibration=calibration_label(snn))


def cmd_stats(args) -> int:
    from ..calibration import iterate_inputs
    from ..stats import spike_statistics

    snn, meta, T = _snn_for(args)
    _, test_loader = _loaders(args, need_train=False)
    if args.snn:
        _check_fits(snn, test_loader, args, f"SNN file {args.snn!r}", snn_T=T)
    xs, n = [], 0
    for x in iterate_inputs(test_loader, args.device, None, progress=False):
        xs.append(x)
        n += len(x)
        if n >= args.images:
            break
    x = torch.cat(xs)[: args.images]
    report = spike_statistics(snn, x)
    print(f"{_model_label(meta)} at {_T_label(T)}, {len(x)} test images")
    print(report.to_text())
    if args.json:
        from .compare import calibration_label, machine_label, provenance

        # As the other subcommands' files: what ran, on what, with which calibration.
        write_json(args.json, {"model": _model_label(meta), "T": T if not isinstance(T, dict) else dict(T),
                               "calibration": calibration_label(snn), **report.as_dict(),
                               "machine": machine_label(args.device),
                               "provenance": {**provenance(), **_run_settings(args)}})
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _search_loaders(args):
    """Calibration and search loaders over disjoint parts of the training split, both in a fixed
    order drawn from ``--seed``: the search is reproducible and scores on images it never calibrated on."""
    from torch.utils.data import Subset

    from . import data

    train, _ = _datasets(args, need_train=True)
    n_search = args.search_batches * args.batch_size
    if len(train) <= n_search:
        raise CLIError(f"--search-batches {args.search_batches} x --batch-size {args.batch_size} holds out all "
                       f"{len(train)} training images; none would be left for calibration")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    search = data.make_loader(Subset(train, order[:n_search]), args.batch_size)
    calib = data.make_loader(Subset(train, order[n_search:n_search + _calib_images(args)]), args.batch_size)
    return calib, search


def cmd_search_t(args) -> int:
    from ..layerwise import search_layer_T

    ann, meta = _load_ann(args)
    calib_loader, search_loader = _search_loaders(args)
    _check_fits(ann, search_loader, args, _model_label(meta))
    res = search_layer_T(ann, calib_loader, search_loader, T_max=args.T_max, candidates=args.candidates,
                         max_loss=args.max_loss, num_search_batches=args.search_batches, device=args.device)
    print(res.to_text())
    if args.json:
        write_json(args.json, {"T": res.T, "accuracy": res.accuracy, "uniform_T": res.uniform_T,
                               "uniform_accuracy": res.uniform_accuracy, "mean_T": res.mean_T,
                               "weighted_T": res.weighted_T, "trials": res.trials})
        print(f"wrote {args.json}")
    return 0


COMMANDS = {"demo": cmd_demo, "convert": cmd_convert, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "stats": cmd_stats, "search-t": cmd_search_t}


def _show_calibration_log() -> None:
    """Print the package's INFO lines (the calibration choice) on stderr, once."""
    import logging

    log = logging.getLogger("sj_parallel_conversion")
    handler = next((h for h in log.handlers if getattr(h, "_sjpc_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("sj-parallel: %(message)s"))
        handler._sjpc_cli = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    handler.stream = sys.stderr  # this run's stderr: main() may run again in-process with stderr redirected


def _check_args(args) -> None:
    """Every argument check, before any work: options that go together or would be ignored
    (:func:`_check_ignored`), per-layer ``--T`` files (:func:`_read_T_files`), every output path;
    then the defaults of :data:`DEFAULTS` are filled in."""
    from ..fileio import check_output_path

    model = getattr(args, "model", None)
    if model is not None and not args.weights:
        raise CLIError("--model needs --weights FILE (a state_dict file for that model)")
    if getattr(args, "weights", None) and model is None:
        raise CLIError("--weights goes with --model NAME (--checkpoint files hold their own weights)")
    if getattr(args, "num_classes", None) is not None and model is None:
        raise CLIError("--num-classes goes with --model NAME")
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    if (mean is None) != (std is None):
        raise CLIError("--mean and --std go together")
    if mean is not None:
        from .data import check_normalisation

        if args.data == "digits":
            raise CLIError("--mean/--std do not apply to --data digits (standardised by its own training split)")
        # The data sets read as RGB have 3 channels; npz files are checked against their own arrays.
        check_normalisation(mean, std, 3 if args.data in ("subset", "cifar10", "cifar100", "imagefolder") else None,
                            names=("--mean", "--std"))
    _check_ignored(args)
    _check_learn_steps(args)
    _read_T_files(args)
    if getattr(args, "device", None) is not None:
        _check_device(args.device)
    inputs = [getattr(args, k, None) for k in ("checkpoint", "weights", "snn")]
    # "is not None": an empty --out "" is a path to refuse, not an option left out.
    outputs = {} if args.command == "demo" else {
        f"--{k}": getattr(args, k) for k in ("out", "json", "csv", "plot") if getattr(args, k, None) is not None}
    seen = {}
    for flag, path in outputs.items():
        check_output_path(path, inputs=inputs, what=flag)
        real = os.path.realpath(path)
        if real in seen:
            raise CLIError(f"{flag} and {seen[real]} name the same file {path!r}")
        seen[real] = flag
    if getattr(args, "plot", None) is not None:
        _check_plot_format(args.plot)
    for name, value in DEFAULTS.items():
        if args.command != "demo" and hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)


def _check_ignored(args) -> None:
    """Refuse, with one line each, options that the rest of the command would ignore."""
    if args.command == "demo":
        return  # run_demo refuses the options of the other demo itself
    given = lambda name: getattr(args, name, None) is not None  # noqa: E731
    data = getattr(args, "data", None)
    if getattr(args, "download", False) and data not in ("cifar10", "cifar100"):
        raise CLIError(f"--download applies to --data cifar10 / cifar100 only, not --data {data}")
    if given("data_root") and data in ("subset", "digits"):
        raise CLIError(f"--data-root does not apply to --data {data}, which ships with the installed packages")
    if getattr(args, "snn", None):
        for name in ("method", "calib_images"):
            if given(name):
                raise CLIError(f"--{name.replace('_', '-')} does not apply to --snn: the saved network is already "
                               "converted and calibrated (convert again from the ANN to change it)")
        Ts = args.T if isinstance(args.T, list) else [args.T]
        if any(isinstance(t, _TFile) for t in Ts):
            raise CLIError("--T FILE does not apply to --snn: the SNN file holds its own (per-layer) T")
    if getattr(args, "calibrate", None) == "no":
        for name in ("method", "alpha"):
            if given(name):
                raise CLIError(f"--{name} does not apply with --calibrate no: nothing is calibrated")
    if given("alpha"):
        if args.method in ("paper", "moment"):
            why = "fixes the paper's 0.99" if args.method == "paper" else "has no moving average"
            raise CLIError(f"--alpha does not apply with --method {args.method}, which {why} (it sets Algorithm 1's "
                           "moving average: --method ema, mse, or the start of auto, distill and learned)")
        if not 0.0 <= args.alpha < 1.0:
            raise CLIError(f"--alpha must lie in [0, 1), got {args.alpha}")
    if args.command == "search-t":
        above = sorted({c for c in args.candidates if c >= args.T_max})
        if above:
            raise CLIError(f"--candidates {' '.join(map(str, above))}: not below --T-max {args.T_max}, so never tried "
                           "(the search only lowers a layer's T)")
    if args.command == "compare":
        if given("method") and not {"parallel", "parallel-count"} & set(args.methods):
            raise CLIError(f"--method does not apply: --methods {' '.join(args.methods)} has no parallel or "
                           "parallel-count row (parallel-learned always learns)")
        if given("calib_images") and set(args.methods) == {"ann"}:
            raise CLIError("--calib-images does not apply: --methods ann converts nothing")


def _read_T_files(args) -> None:
    """Replace every ``--T FILE`` by the per-layer T it holds (:class:`LayerT`): the ``"T"`` mapping
    of a ``search-t --json`` file, or a plain ``{site: T}`` mapping."""
    import json

    def read(path: str) -> LayerT:
        if not os.path.isfile(path):
            raise CLIError(f"--T {path}: " + ("is a folder, not a file" if os.path.isdir(path) else "no such file"))
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CLIError(f"--T {path}: not a JSON file ({_one_line(exc)})") from None
        layers = doc.get("T") if isinstance(doc, dict) and isinstance(doc.get("T"), dict) else doc
        if not isinstance(layers, dict) or not layers:
            raise CLIError(f"--T {path}: expected a JSON object of per-layer T ({{\"site\": T, ...}}) or the "
                           "output of 'search-t --json' (with such an object under \"T\")")
        bad = [f"{k!r}: {v!r}" for k, v in layers.items()
               if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise CLIError(f"--T {path}: every layer's T must be a positive integer; got {', '.join(bad[:3])}")
        out = LayerT(layers)
        out.source = path
        return out

    T = getattr(args, "T", None)
    if args.command not in ("convert", "evaluate", "stats") or T is None:
        return
    if isinstance(T, list):
        args.T = [read(t) if isinstance(t, _TFile) else t for t in T]
    elif isinstance(T, _TFile):
        args.T = read(T)


def _check_learn_steps(args) -> None:
    """--learn-steps sets the learned fit: refuse it where no learned calibration runs."""
    if args.command == "demo" or getattr(args, "learn_steps", None) is None:
        return
    if getattr(args, "snn", None):
        raise CLIError("--learn-steps does not apply to --snn: the saved network is already calibrated")
    if getattr(args, "calibrate", None) == "no":
        raise CLIError("--learn-steps does not apply with --calibrate no: nothing is calibrated")
    method = args.method or DEFAULTS["method"]
    learns = method in ("auto", "learned", "distill")
    if args.command == "compare":
        # parallel-learned always learns; the other parallel rows follow --method.
        learns = "parallel-learned" in args.methods or (
            learns and any(m in args.methods for m in ("parallel", "parallel-count")))
        if not learns:
            raise CLIError(f"--learn-steps does not apply: with --method {method} and --methods "
                           f"{' '.join(args.methods)} no learned calibration runs (add parallel-learned to "
                           "--methods, or use --method auto, distill or learned)")
    elif not learns:
        raise CLIError(f"--learn-steps does not apply with --method {method}, which learns nothing "
                       "(use --method auto, distill or learned, or drop --learn-steps)")


def _check_device(device: str) -> None:
    """A device string torch understands, on a device this machine has."""
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError) as exc:  # a bad string; no driver; torch built without CUDA
        raise CLIError(f"--device {device}: {_one_line(exc)}") from None


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status (0; 2 for bad input, :data:`USER_ERRORS`; 130 for
    Ctrl-C; 1 for a bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the provenance of result files
    from .. import distributed

    try:
        _check_args(args)
        if distributed.init_from_env() and args.command not in ("convert", "evaluate"):
            raise CLIError(f"'{args.command}' does not run under torchrun; use convert or evaluate")
        _show_calibration_log()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("sj-parallel: interrupted (no output file was written or changed)", file=sys.stderr)
        return 130
    except Exception as exc:  # the traceback with --debug; else one line, a bug never disguised as bad input
        if args.debug:
            raise
        status, line = _error_line(exc, args)
        print(line, file=sys.stderr)
        return status


def _error_line(exc: Exception, args) -> Tuple[int, str]:
    """Exit status and message for ``exc``: 2 for the user's input or machine, 1 for a bug."""
    if _raised_while_tracing(exc):
        # The model's own forward failed under torch.fx (a loop over a size, say): the user's
        # model, not this package, whichever type fx raised (TraceError, TypeError, ...).
        return 2, (f"sj-parallel: error: the model cannot be traced by torch.fx, which conversion needs (no Python "
                   f"control flow on tensor values or sizes in forward): {type(exc).__name__}: {_one_line(exc)}")
    if isinstance(exc, USER_ERRORS):
        return 2, f"sj-parallel: error: {_one_line(exc)}"
    if _is_out_of_memory(exc):  # the machine, not a bug (CUDA's, the CPU allocator's, Python's): say what to lower
        return 2, (f"sj-parallel: error: out of memory on {getattr(args, 'device', 'the device')} "
                   f"({_one_line(exc)}); lower --batch-size")
    if _peer_stopped(exc):
        return 1, ("sj-parallel: error: another process of this torchrun job stopped (its own error says why), so "
                   f"this one could not go on: {type(exc).__name__}: {_one_line(exc)}")
    return 1, (f"sj-parallel: internal error: {type(exc).__name__}: {_one_line(exc)} (a bug in sj-parallel, not "
               "in the input; run with --debug for the traceback)")


def _peer_stopped(exc: BaseException) -> bool:
    """Did a collective fail because another process of the job ended? Under torchrun a user error
    on one rank reaches the others as a closed connection, which is no bug of theirs."""
    import torch.distributed as dist

    from .. import distributed

    if not distributed.is_distributed():
        return False
    text = str(exc)
    return isinstance(exc, dist.DistNetworkError) or "closed by peer" in text or "reset by peer" in text


def _raised_while_tracing(exc: BaseException) -> bool:
    """Was ``exc`` raised inside ``torch.fx.Tracer.trace``, i.e. by a model's forward being traced?"""
    import inspect
    import traceback

    from torch import fx

    code = inspect.unwrap(fx.Tracer.trace).__code__
    return any(frame.f_code is code for frame, _ in traceback.walk_tb(exc.__traceback__))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
