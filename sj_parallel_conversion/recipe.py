"""``ParallelConversionRecipe`` and ``ParallelConverter``: parallel conversion inside SpikingJelly's
``ann2snn`` flow.

SpikingJelly's ``FXConverter`` runs a fixed template (validate, before_trace, trace, after_trace,
insert_observers, calibrate, replace, finalize); the recipe fills it with the paper's stages:

===================  ==========================================================================
after_trace          activation calls back to modules, fold BN into conv (torch's fusion),
                     canonicalise and validate the graph, decide the conversion case
                     (paper Table 2)
insert_observers     ReLU sites get a :class:`~.observers.MaxObserver` (training-free case)
calibrate            record maxima (ReLU -> ClipReLU), then Algorithm 1 (-> DA-QCFS at T)
replace              DA-QCFS -> :class:`~.ParallelConversionNode`; stateless layers become
                     SpikingJelly step modules; the model is left in multi-step mode
===================  ==========================================================================
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.ann2snn import FXConversionRecipe, FXConverter
from torch import fx

from . import calibration, formulas, kernels
from .activation import DAQCFS, QCFS, ClipReLU
from .augment import with_blends
from .graph import activation_sites, check_batch_axis, keep_analog, prepare_graph, to_multistep
from .joins import insert_time_joins
from .learned import BlockCacheTooLarge, DistillCalibration, LearnedCalibration, held_out_score, learn_calibration, split_images, take_images
from .fx_nodes import module_device
from .network import as_converted_network
from .neuron import ParallelConversionNode
from .observers import MaxObserver
from .selection import PREFERENCE, SIGN_TEST_Z, CalibrationReport, choose, irreplaceable, passed_over, share
from .reuse import reuse_memory

logger = logging.getLogger("sj_parallel_conversion")
from .tracing import activation_calls_to_modules, check_trace, fold_bn

__all__ = ["ParallelConversionRecipe", "ParallelConverter", "parallel_neuron_factory", "conversion_case",
           "ConversionCase", "CalibrationSettings", "NetworkSettings", "with_calibration"]

MODES = ("auto", "qcfs", "relu")
METHODS = ("auto", "paper", "ema", "moment", "mse", "learned", "distill")
#: Methods that fit parameters by gradient descent, and the fit ``method="auto"`` tries.
FITS = ("learned", "distill")
#: Methods that calibrate in one or two passes over the data.
CHEAP = ("paper", "ema", "moment", "mse")
#: Cheap calibrations that differ only in where Algorithm 1 starts: auto builds them in one pass.
SHARED_PASS = ("ema", "mse")
AUTO_FIT = "distill"
#: Calibration images on which the traced graph is compared with the model (tracing.check_trace).
TRACE_CHECK_IMAGES = 32
#: Most input bytes per batch of the Algorithm 1 pass inside learned, distill and auto, which run
#: it on their fitting images, and of their scoring of held-out and selection images: as one batch
#: where they fit in this (1,024 CIFAR images are 12 MiB), else in batches that do, so that large
#: images cannot make one activation tensor of gigabytes.
ALGORITHM_1_BATCH_BYTES = 64 << 20
#: Seed of the partners of ``auto``'s selection blends.
SELECTION_SEED = 20250713


@dataclasses.dataclass
class ConversionCase:
    """Which of the paper's three cases (Table 2) a prepared graph falls in, and so which stages run.

    ``source``: ``"qcfs"`` or ``"relu"``, the kind of the ANN's activations; ``record_max``:
    ReLU sites first record their per-channel maxima (ReLU -> ClipReLU); ``calibrate``: the sites
    are calibrated for ``T`` (DA-QCFS), which a QCFS network with ``L == T`` everywhere does not need.
    """

    source: str
    record_max: bool
    calibrate: bool


def conversion_case(gm: fx.GraphModule, T: Union[int, Callable[[str], int]], mode: str = "auto") -> ConversionCase:
    """Which of the paper's three cases applies (Table 2) to a prepared graph."""
    t_of = T if callable(T) else (lambda _: T)
    sites = [(n.target, gm.get_submodule(n.target)) for n in activation_sites(gm)]
    if not sites:
        raise ValueError("the model has no ReLU or QCFS activation to convert")
    kinds = {"qcfs" if isinstance(m, (QCFS, DAQCFS)) else "relu" for _, m in sites}
    if mode == "auto":
        if len(kinds) > 1:
            qc = [t for t, m in sites if isinstance(m, (QCFS, DAQCFS))][:3]
            rl = [t for t, m in sites if not isinstance(m, (QCFS, DAQCFS))][:3]
            raise ValueError(f"the model mixes QCFS sites ({', '.join(qc)}, ...) and ReLU sites ({', '.join(rl)}, "
                             "...); convert a model with one kind of activation")
        source = kinds.pop()
    else:
        source = mode
        wrong = [t for t, m in sites if (isinstance(m, (QCFS, DAQCFS))) != (mode == "qcfs")]
        if wrong:
            raise ValueError(f"mode={mode!r} but activation sites {wrong[:3]} are of the other kind")
    if source == "qcfs":
        lossless = all(isinstance(m, QCFS) and m.L == t_of(t) or isinstance(m, DAQCFS) and m.T == t_of(t)
                       for t, m in sites)
        return ConversionCase("qcfs", record_max=False, calibrate=not lossless)
    return ConversionCase("relu", record_max=True, calibrate=True)


def _fraction(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1){' or None' if allow_none else ''}, got {value!r}")


def _tristate(name: str, value: Any) -> None:
    if value not in (None, True, False):
        raise ValueError(f"{name} must be None, True or False, got {value!r}")


@dataclasses.dataclass
class CalibrationSettings:
    """How :class:`ParallelConversionRecipe` calibrates, beyond the ``method`` it is given.

    Args:
        calibrate: calibrate the neurons at ``T``; ``None`` (default) does so exactly when the
            case needs it (always for ReLU networks, for QCFS networks when ``T != L``). ``False``
            takes no ``method`` other than the default (the recipe refuses one).
        num_batches: at most this many calibration batches per pass.
        alpha: EMA momentum of Algorithm 1 (paper: 0.99 over one epoch).
        bias_correction: divide the EMAs by ``1 - alpha**n`` (see :class:`~.observers.DACalibrator`).
        learned: options of ``method="learned"`` (default ``LearnedCalibration()``).
        distill: options of ``method="distill"`` and of auto's fit (default ``DistillCalibration()``).
        selection_fraction: ``method="auto"``: the share of the calibration images kept for the
            choice between candidates.
        selection_blends: ``method="auto"``: the candidates are also scored on this many blends
            of every selection image with other selection images (:func:`~.augment.blends`,
            weights ``1 - r / (k + 1)``), against the ANN's outputs for the blends. On the
            training images themselves the ANN is confident and an uncalibrated network at large
            ``T`` misses almost none, so they cannot show a calibration that is closer to the
            ANN on new images; on blends the ANN is less sure and the difference shows. 0 scores
            the selection images alone.
        skip_agreement: ``method="auto"``: the agreement on the selection images themselves (not
            their blends) of the most agreeing cheap candidate ("none", "ema", "mse") at which the
            fit is skipped: a bound on cost rather than on the choice (the fit could gain at most
            the remaining selection images, and at large ``T``, where this happens, it is never
            kept); ``None`` never skips it for agreement (it is still skipped where no calibration
            cannot be replaced, :func:`~.selection.irreplaceable`).
    """

    calibrate: Optional[bool] = None
    num_batches: Optional[int] = None
    alpha: float = 0.99
    bias_correction: bool = True
    learned: LearnedCalibration = dataclasses.field(default_factory=LearnedCalibration)
    distill: DistillCalibration = dataclasses.field(default_factory=DistillCalibration)
    selection_fraction: float = 0.125
    selection_blends: int = 3
    skip_agreement: Optional[float] = 0.99

    def check(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the first setting out of range."""
        _tristate("calibrate", self.calibrate)
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int)
                                             or self.num_batches < 1):
            raise ValueError(f"num_batches must be None or an integer >= 1, got {self.num_batches!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha < 1.0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a number in [0, 1), got {self.alpha!r}")
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"bias_correction must be True or False, got {self.bias_correction!r}")
        # Each method's options class carries its defaults (distill's weight rate and blocks): the
        # other class given for it would run the other method's defaults under this one's name.
        for name, cls in (("learned", LearnedCalibration), ("distill", DistillCalibration)):
            value = getattr(self, name)
            if not isinstance(value, cls) or (cls is LearnedCalibration and isinstance(value, DistillCalibration)):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
            value.check()
        _fraction("selection_fraction", self.selection_fraction)
        if isinstance(self.selection_blends, bool) or not isinstance(self.selection_blends, int) \
                or self.selection_blends < 0:
            raise ValueError(f"selection_blends must be an integer >= 0, got {self.selection_blends!r}")
        _fraction("skip_agreement", self.skip_agreement, allow_none=True)


@dataclasses.dataclass
class NetworkSettings:
    """What the converted network is made of, beyond its neurons' calibrated parameters.

    Args:
        backend, spike_order: passed to every :class:`~.ParallelConversionNode`.
        inplace: let the converted network overwrite its temporaries (default ``True``): each
            neuron that is the only reader of its input currents writes its spikes over them, and
            each residual sum adds into the convolution output it reads (same outputs, bit for
            bit; on CPU 1.25x faster at spike level for ResNet-20 at T = 32, batch 256). A
            monitor that keeps references to convolution outputs or neuron inputs then sees
            overwritten values; convert with ``inplace=False`` or record clones (see
            :mod:`~sj_parallel_conversion.reuse`).
        fuse_bn: fold BatchNorm into the preceding convolution (:func:`~.tracing.fold_bn`);
            ``None`` (default) folds unless the conversion is lossless (QCFS with ``T == L``
            everywhere), where folding would change the rounding of activations that lie on a
            level boundary.
        analog_sites: names of ReLU sites that stay analog (:func:`~.sites.keep_analog`), for
            example a stem whose input is the image itself.
    """

    backend: str = "auto"
    spike_order: str = "late"
    inplace: bool = True
    fuse_bn: Optional[bool] = None
    analog_sites: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.analog_sites = tuple(self.analog_sites)

    def check(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the first setting out of range."""
        kernels.check_backend(self.backend)
        formulas.check_spike_order(self.spike_order)
        if not isinstance(self.inplace, bool):
            raise TypeError(f"inplace must be True or False, got {self.inplace!r}")
        _tristate("fuse_bn", self.fuse_bn)
        if not all(isinstance(n, str) for n in self.analog_sites):
            raise TypeError(f"analog_sites must be site names (strings), got {self.analog_sites!r}")


def with_calibration(options: Optional[Dict[str, Any]], **changes: Any) -> Dict[str, Any]:
    """A copy of the recipe keyword arguments ``options`` whose ``calibration`` settings (default
    ``CalibrationSettings()``) have ``changes``: for code that converts with options it was given
    and sets some calibration settings itself (how many batches, for example)."""
    out = dict(options or {})
    out["calibration"] = dataclasses.replace(out.get("calibration") or CalibrationSettings(), **changes)
    return out


class ParallelConversionRecipe(FXConversionRecipe):
    """Convert a QCFS or ReLU ANN into a parallel-spiking SNN running ``T`` time steps.

    Args:
        T: inference time steps (int >= 1), or a dict mapping activation-site names to their T
            (per-layer time steps; unnamed sites use ``default_T``).
        dataloader: calibration batches (tensors, ``(x, y)`` tuples or dicts); needed unless the
            ANN is a QCFS network with ``L == T`` everywhere.
        method: how to calibrate:

            * ``"auto"`` (default): fits the candidates "none" (no calibration), "ema"
              (Algorithm 1) and "mse", then ``"distill"`` unless one of those already agrees with
              the ANN on at least ``skip_agreement`` of the selection images, and keeps the one
              that agrees best with the ANN on those images among the candidates that beat no
              calibration clearly there (a paired sign test, :func:`~.selection.choose`), or no
              calibration if none does (the selection images are a share ``selection_fraction``
              of the calibration images that no fit reads; see
              :class:`~.selection.CalibrationReport`, stored as ``snn.calibration_report``);
            * ``"distill"``: learns every neuron's per-channel ``theta_pre``, ``theta_post`` and
              ``psi_da`` and the network's weights and biases from the ANN's outputs
              (:class:`~.learned.DistillCalibration`);
            * ``"learned"``: the same with the neurons' parameters only
              (:class:`~.learned.LearnedCalibration`);
            * ``"ema"``: Algorithm 1 with this library's settings (``alpha``, ``bias_correction``);
            * ``"paper"``: Algorithm 1 with the paper's settings: ``alpha = 0.99``, no bias
              correction, statistics over every calibration batch, sites fed by convolutions
              only (sites after fully connected layers keep ``psi_da = phi_da = 0``);
            * ``"moment"``: per-channel moment matching of ``phi_da`` and ``psi_da``;
            * ``"mse"``: each ClipReLU site's per-channel threshold chosen for ``T`` levels by the
              squared error of its output (:func:`~.calibration.mse_thresholds`) instead of the
              recorded maximum, then Algorithm 1 (the start of the two fits by default).

            The settings the methods read (``alpha``, ``skip_agreement``, the fits' options...)
            are ``calibration``'s.
        calibration: :class:`CalibrationSettings` (default ``CalibrationSettings()``).
        network: :class:`NetworkSettings`, what the converted network is made of (default
            ``NetworkSettings()``).
        mode: ``"auto"`` (QCFS if the model has QCFS modules, else ReLU), ``"qcfs"`` or ``"relu"``.
        default_T: T of sites missing from a per-layer ``T`` dict.
        progress: show tqdm progress bars.
        reducer: ``reducer(tensor, op)`` summing/maxing statistics across processes (distributed).
    """

    def __init__(
        self,
        T: Union[int, Dict[str, int]],
        dataloader: Optional[Iterable] = None,
        method: str = "auto",
        *,
        calibration: Optional[CalibrationSettings] = None,
        network: Optional[NetworkSettings] = None,
        mode: str = "auto",
        default_T: Optional[int] = None,
        progress: bool = True,
        reducer: Optional[Callable] = None,
    ) -> None:
        self.T = T
        self.dataloader = dataloader
        self.method = method
        self.calibration = CalibrationSettings() if calibration is None else calibration
        self.network = NetworkSettings() if network is None else network
        self.mode = mode
        self.default_T = default_T
        self.progress = progress
        self.reducer = reducer
        self.case: Optional[ConversionCase] = None
        self.report: Optional[CalibrationReport] = None
        self._data: Optional[calibration.CalibrationData] = None
        self._ann_name = "model"
        self._reference: Optional[nn.Module] = None
        self._check_options()

    # -- validation ------------------------------------------------------------------------------
    def _check_options(self) -> None:
        def check_T(name, t):
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {t!r}")

        if isinstance(self.T, dict):
            if not self.T:
                raise ValueError("per-layer T must not be an empty dict")
            for k, v in self.T.items():
                check_T(f"T[{k!r}]", v)
            if self.default_T is not None:
                check_T("default_T", self.default_T)
        else:
            check_T("T", self.T)
            if self.default_T is not None:
                raise ValueError(f"default_T={self.default_T!r} applies only to a per-layer T dict, not to T={self.T!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name, kind in (("calibration", CalibrationSettings), ("network", NetworkSettings)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
            value.check()
        if self.calibration.calibrate is False and self.method != "auto":
            raise ValueError(f"method={self.method!r} does not apply with CalibrationSettings(calibrate=False): "
                             "nothing is calibrated (leave method at its default)")

    def _T_text(self) -> str:
        return f"T={self.T}" if not isinstance(self.T, dict) else "per-layer T"

    def T_of(self, site: str) -> int:
        """Time steps of the activation site ``site``."""
        if not isinstance(self.T, dict):
            return self.T
        if site in self.T:
            return self.T[site]
        if self.default_T is None:
            raise ValueError(f"per-layer T has no entry for activation site {site!r} and no default_T")
        return self.default_T

    def validate(self, converter: FXConverter) -> None:
        self._check_options()

    # -- stages ----------------------------------------------------------------------------------
    def before_trace(self, converter: FXConverter, ann: nn.Module) -> nn.Module:
        # Only the model changes here: SpikingJelly's plain tracer keeps the package's
        # activations whole on its own (see activation.activation_call).
        ann.eval()
        self.report = None
        self._reference = None
        self._data = None
        self._ann_name = type(ann).__name__
        self._ann = ann  # compared with its trace on the first calibration batch, then dropped
        check_model_arity(ann)
        return ann

    def after_trace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        fx_model = activation_calls_to_modules(fx_model)
        fx_model = prepare_graph(fx_model)
        if self.network.analog_sites:
            keep_analog(fx_model, self.network.analog_sites)
        if isinstance(self.T, dict):
            names = {n.target for n in activation_sites(fx_model)}
            unknown = sorted(set(self.T) - names)
            if unknown:
                raise ValueError(f"per-layer T names unknown activation sites {unknown}; sites are {sorted(names)}")
            for n in names:
                self.T_of(n)
        case = conversion_case(fx_model, self.T_of, self.mode)
        lossless = case.source == "qcfs" and not case.calibrate
        fuse_bn = self.network.fuse_bn
        if self.calibration.calibrate is not None:
            case.calibrate = self.calibration.calibrate
        if (case.calibrate or case.record_max) and self.dataloader is None:
            why = "records per-channel maxima of a ReLU network" if case.record_max else \
                "calibrates DA-QCFS because T differs from the QCFS level L"
            raise ValueError(f"ParallelConversionRecipe {why}: pass dataloader=... with calibration data")
        self.case = case
        ann, self._ann = self._ann, None
        if case.calibrate or case.record_max:
            # Data is read only once the graph is known to convert: a refused model costs no
            # calibration pass, and a one-shot iterator is not consumed for nothing.
            self._data = calibration.CalibrationData(self.dataloader, self.calibration.num_batches)
            first = self._data.first()
            check_model_input(fx_model, first, self._ann_name)
            # Before folding BatchNorm, which changes rounding, and before the move to the
            # converter's device, which would move the modules the graph shares with the ANN
            # and not the ANN's own buffers: the graph must then match the model where it is.
            check_trace(ann, fx_model, first[:TRACE_CHECK_IMAGES], self._ann_name)
            # What the static graph check took on trust (a leading -1, negative axes), measured.
            check_batch_axis(fx_model, first)
        fx_model = fx_model.to(converter.device)
        if fuse_bn if fuse_bn is not None else not lossless:
            fx_model = fold_bn(fx_model)
        return fx_model

    def insert_observers(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        if self.case.calibrate and self.method in ("auto",) + FITS:
            # The ANN itself (original activations, BN folded as in the SNN) is what learned
            # calibration matches; keep it before observers and calibration change the sites.
            self._reference = copy.deepcopy(fx_model).eval()
        if self.case.record_max:
            calibration.replace_sites(
                fx_model, lambda _, m: MaxObserver(m, reducer=self.reducer) if isinstance(m, (nn.ReLU, ClipReLU)) else m)
        return fx_model

    def calibrate(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        dev = converter.device
        if self.case.record_max:
            fx_model.eval()
            with torch.no_grad():
                for x in calibration.iterate_inputs(self._data, dev, None, "recording thresholds", self.progress):
                    fx_model(x)
            calibration.replace_sites(fx_model, lambda name, m: m.to_clip_relu(site=name) if isinstance(m, MaxObserver) else m)
        if not self.case.calibrate:
            return calibration.to_daqcfs(fx_model, self.T_of)
        if self.method in CHEAP:
            start = time.perf_counter()
            fx_model = self._cheap(self.method, fx_model, self._data, dev)
            self.report = CalibrationReport(requested=self.method, method=self.method,
                                            seconds={self.method: time.perf_counter() - start})
            return fx_model
        return self._calibrate_by_measurement(fx_model, dev)

    def _cheap(self, name: str, fx_model: fx.GraphModule, data, dev) -> fx.GraphModule:
        """The calibrations that fit nothing by gradient descent, on ``data``."""
        if name == "none":
            return calibration.to_daqcfs(fx_model, self.T_of)
        if name == "paper":
            return calibration.calibrate_da(fx_model, data, self.T_of, dev, None, 0.99, False, self.progress,
                                            self.reducer, "ema", sites=calibration.convolution_sites(fx_model))
        return self._algorithm_1([name], fx_model, data, dev)[0][0]

    def _algorithm_1(self, names: Sequence[str], fx_model: fx.GraphModule, data,
                     dev) -> Tuple[List[fx.GraphModule], float]:
        """Algorithm 1 with the recipe's settings from the start each of ``names`` needs (``"ema"``
        and ``"moment"`` the recorded maxima, ``"mse"`` squared-error thresholds), in one pass
        over ``data``; the networks (the first is ``fx_model`` itself) and the seconds the
        threshold search took."""
        start = time.perf_counter()
        starts = [calibration.mse_thresholds(fx_model, data, self.T_of, dev, reducer=self.reducer) if name == "mse"
                  else None for name in names]
        searched = time.perf_counter() - start
        settings = self.calibration
        graphs = calibration.calibrate_da_variants(fx_model, data, self.T_of, dev, starts, None, settings.alpha,
                                                   settings.bias_correction, self.progress, self.reducer,
                                                   "moment" if "moment" in names else "ema")
        return graphs, searched

    def _cheap_together(self, names: Sequence[str], fx_model: fx.GraphModule, data,
                        dev) -> Dict[str, Tuple[fx.GraphModule, float]]:
        """:meth:`_cheap` for each of ``names`` on a copy of ``fx_model``, with the seconds each
        took. Those in ``SHARED_PASS`` differ only in where Algorithm 1 starts, so they run it in
        one pass that computes the ANN's stream once; each is charged half of that pass (and
        ``mse`` its threshold search)."""
        if len(names) == 1 or not set(names) <= set(SHARED_PASS):
            built = {}
            for name in names:
                start = time.perf_counter()
                built[name] = (self._cheap(name, copy.deepcopy(fx_model), data, dev), time.perf_counter() - start)
            return built
        start = time.perf_counter()
        graphs, searched = self._algorithm_1(names, copy.deepcopy(fx_model), data, dev)
        each = (time.perf_counter() - start - searched) / len(names)
        return {name: (g, each + (searched if name == "mse" else 0.0)) for name, g in zip(names, graphs)}

    def _fit_options(self, method: str) -> LearnedCalibration:
        return self.calibration.distill if method == "distill" else self.calibration.learned

    def _calibrate_by_measurement(self, fx_model: fx.GraphModule, dev) -> fx.GraphModule:
        """``method="learned"``, ``"distill"`` or ``"auto"``: fit, then measure on images held out.

        The calibration images are split three ways, each part used by one step only: the fit
        (and Algorithm 1) learns from the first, the fit's early stopping reads the second, and
        ``auto``'s choice between the candidates reads the third.
        """
        fitting = self.method if self.method in FITS else AUTO_FIT
        opts = self._fit_options(fitting)
        clock = time.perf_counter()
        images = take_images(calibration.iterate_inputs(self._data, "cpu", None, "reading calibration data",
                                                        self.progress), opts.max_images)
        select: Optional[list] = None
        if self.method == "auto":
            total = sum(int(x.shape[0]) for x in images)
            if total < 3:
                raise ValueError(f"the calibration data holds {total} image(s); method='auto' needs at least 3 "
                                 "(selection, fitting and held-out images)")
            images, select = split_images(images, self.calibration.selection_fraction)
        fit, stop = split_images(images, opts.holdout)
        logger.info("calibration: %d images read (%.1f s)", sum(int(x.shape[0]) for x in images) +
                    (int(select[0].shape[0]) if select else 0), time.perf_counter() - clock)
        sites = [n.target for n in activation_sites(fx_model)]
        candidates: Dict[str, fx.GraphModule] = {}
        seconds: Dict[str, float] = {}
        skipped: Dict[str, str] = {}
        scores: Dict[str, Dict[str, float]] = {}
        hits: Dict[str, torch.Tensor] = {}  # per candidate, its per-image agreement on the judging images
        judge = select if select is not None else stop
        plain = sum(int(x.shape[0]) for x in judge)  # the judged images before any blend
        blended = 0
        if select is not None and self.calibration.selection_blends:
            judged = with_blends(torch.cat(list(select)), self.calibration.selection_blends, SELECTION_SEED)
            blended = int(judged.shape[0]) - plain
            judge = list(torch.split(judged, max(1, plain)))
        judge = _bounded(judge)
        with torch.no_grad():
            judge_ref = [self._reference(x.to(dev)) for x in judge]

        def score(name: str) -> None:
            per_image: List[torch.Tensor] = []
            scores[name] = held_out_score(candidates[name], judge, judge_ref, dev, self.reducer, per_image)
            hits[name] = per_image[0]
            logger.info("calibration at %s: %s agrees with the ANN on %.1f %% of %d %s (%.1f s)", self._T_text(),
                        name, 100 * scores[name]["agreement"], scores[name]["images"],
                        ("selection images and blends" if blended else "selection images") if select is not None
                        else "held-out images", seconds[name])

        cheap = ("none", "ema", "mse") if self.method == "auto" else (opts.start,)
        for name in cheap:
            if name in skipped or name in candidates:
                continue
            group = [name] + [n for n in cheap if name in SHARED_PASS and n in SHARED_PASS and n != name
                              and n not in skipped]
            for built, (candidate, spent) in self._cheap_together(group, fx_model, _bounded(fit), dev).items():
                candidates[built], seconds[built] = candidate, spent
            if self.method != "auto":
                continue
            for built in group:
                score(built)
            if name == PREFERENCE[0]:
                # Where no calibration misses too few selection images for any candidate to pass
                # the sign test against it, measuring the others cannot change the choice.
                stuck, misses = irreplaceable(hits[name], self.reducer)
                if stuck:
                    reason = (f"{name} disagrees with the ANN on {misses} of {scores[name]['images']} selection "
                              f"images{' and blends' if blended else ''}; no calibration can be clearly better "
                              f"with {SIGN_TEST_Z ** 2:g} or fewer to gain")
                    for other in cheap[1:] + (fitting,):
                        skipped[other] = reason
                    logger.info("calibration: %s skipped: %s", ", ".join(cheap[1:] + (fitting,)), reason)
        if self.method == "auto" and fitting not in skipped:
            # A bound on cost, not on the choice: the most agreeing cheap candidate on the selection
            # images themselves leaves a fit at most the rest of them. Blends are left out on
            # purpose: harder by design, they would rarely allow a skip, and at large T the fit
            # (minutes) is never kept.
            agree = {n: share(hits[n][:plain], self.reducer) for n in scores}
            best = max(agree, key=lambda n: agree[n])
            skip = self.calibration.skip_agreement
            if skip is not None and agree[best] >= skip:
                skipped[fitting] = (f"{best} already agrees with the ANN on {100 * agree[best]:.1f} % "
                                    f"of the selection images themselves, blends left out (>= {100 * skip:g} %)")
                logger.info("calibration: %s skipped: %s", fitting, skipped[fitting])
        history = None
        if fitting not in skipped:
            origin = candidates[opts.start]
            try:
                with torch.enable_grad():
                    fitted, history = learn_calibration(
                        copy.deepcopy(origin) if self.method == "auto" else origin, self._reference, fit, stop,
                        self.T_of, sites, opts, dev, self.reducer, self.progress, label=fitting)
            except BlockCacheTooLarge as err:
                if self.method != "auto":
                    raise
                # auto still has its cheap candidates; the report says why the fit is missing.
                skipped[fitting] = str(err)
                logger.warning("calibration: %s skipped: %s", fitting, err)
            else:
                candidates[fitting] = fitted
                seconds[fitting] = history["seconds"]
                score(fitting)
        chosen = choose(scores, hits, self.reducer) if self.method == "auto" else fitting
        passed = passed_over(scores, hits, chosen, self.reducer) if self.method == "auto" else {}
        if self.method != "auto":
            candidates = {chosen: candidates[chosen]}
        self.report = CalibrationReport(
            requested=self.method, method=chosen, scores=scores, seconds=seconds, skipped=skipped,
            fit_images=sum(int(x.shape[0]) for x in fit), held_out_images=sum(int(x.shape[0]) for x in stop),
            selection_images=plain if select else 0, selection_blends=blended, learned=history,
            passed_over=passed)
        logger.info("%s", self.report.summary())
        self._reference = None
        return candidates[chosen]

    def replace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        calibration.to_nodes(fx_model, backend=self.network.backend, spike_order=self.network.spike_order)
        fx_model = insert_time_joins(to_multistep(fx_model))
        return fx_model.to(converter.device)

    def finalize(self, converter: FXConverter, fx_model: fx.GraphModule) -> nn.Module:
        # A root that checks every module before set_step_mode switches any (network.py).
        fx_model = as_converted_network(fx_model)
        functional.set_step_mode(fx_model, "m")
        if self.network.inplace:
            reuse_memory(fx_model)
        fx_model.eval()
        fx_model.calibration_report = self.report
        self._data = None
        return fx_model


def _bounded(batches: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``batches`` cut where one holds more than :data:`ALGORITHM_1_BATCH_BYTES` of input."""
    out = []
    for b in batches:
        per_image = max(1, b[:1].numel() * b.element_size())
        out.extend(torch.split(b, max(1, ALGORITHM_1_BATCH_BYTES // per_image)))
    return out


def check_model_arity(ann: nn.Module) -> None:
    """Before tracing: calibration batches provide one input tensor, so ``forward`` takes one."""
    try:
        params = inspect.signature(ann.forward).parameters.values()
    except (TypeError, ValueError):
        params = ()
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(required) > 1:
        raise ValueError(f"{type(ann).__name__}.forward takes {len(required)} required inputs ({', '.join(required)}); "
                         "calibration batches provide one input tensor, and parallel conversion supports "
                         "single-input models")


def check_model_input(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """Before calibrating: the (traced) model runs on one calibration image."""
    # Run where the weights are: the converter may have moved the traced copy.
    where = module_device(model, x.device)
    try:
        with torch.no_grad():
            model(x[:1].to(where))
    except Exception as exc:
        raise ValueError(f"{name} cannot run on the first calibration batch "
                         f"(input shape {tuple(x.shape)}, dtype {x.dtype}): {type(exc).__name__}: {exc}") from exc


class ParallelConverter(FXConverter):
    """``ann2snn.FXConverter`` that also builds the recipe from its name and options.

    ``ParallelConverter("parallel", T=4, dataloader=loader).convert(ann)`` and
    ``ann2snn.Converter(ParallelConversionRecipe(4, loader)).convert(ann)`` are the same; any
    other ``FXConversionRecipe`` instance is accepted as ``ann2snn.Converter`` accepts it.
    """

    def __init__(self, recipe: Union[str, FXConversionRecipe] = "parallel",
                 device: Optional[Union[str, torch.device]] = None, **recipe_options: Any) -> None:
        if isinstance(recipe, str):
            if recipe != "parallel":
                raise ValueError(f"unknown recipe {recipe!r}: give \"parallel\" or an FXConversionRecipe instance")
            recipe = ParallelConversionRecipe(**recipe_options)
        elif recipe_options:
            raise TypeError(f"recipe options {sorted(recipe_options)} are only accepted with a recipe name; "
                            "pass them to the recipe's constructor instead")
        super().__init__(recipe, device=device)


def parallel_neuron_factory(T: int, **node_kwargs: Any) -> Callable[[float], ParallelConversionNode]:
    """A ``neuron_factory`` for SpikingJelly's ``RateCodingRecipe``.

    ``RateCodingRecipe(loader, neuron_factory=parallel_neuron_factory(T))`` keeps SpikingJelly's
    threshold estimation (max or percentile of the ReLU output) and its input/output scalers, and
    puts a parallel neuron with unit threshold and the half-threshold shift between them. That
    equals ClipReLU -> uncalibrated DA-QCFS at ``T``; the full :class:`ParallelConversionRecipe`
    additionally calibrates ``psi_da``/``phi_da`` (Algorithm 1) and supports QCFS networks.

    ``RateCodingRecipe`` returns a single-step network, and the parallel node runs in multi-step
    mode only: switch the result with ``functional.set_step_mode(net, "m")`` and feed it
    ``[T, N, ...]`` (or use :func:`spike_inference`). An IF-style loop over single steps
    (``net(x)`` with ``x`` of shape ``[N, ...]``) would hand each node ``N`` images that it reads
    as ``N`` time steps of one image, with no error to show it.
    """
    def factory(scale: float) -> ParallelConversionNode:
        return ParallelConversionNode(T, v_threshold=1.0, **node_kwargs)

    return factory

