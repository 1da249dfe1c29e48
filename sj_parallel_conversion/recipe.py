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

import math
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.ann2snn import FXConversionRecipe, FXConverter
from torch import fx

from . import calibration, kernels, registry
from .activation import DAQCFS, QCFS, ClipReLU
from .graph import activation_sites, keep_analog, prepare_graph, to_multistep
from .joins import insert_time_joins
from .neuron import ParallelConversionNode
from .observers import MaxObserver
from .tracing import activation_calls_to_modules, fold_bn

__all__ = ["ParallelConversionRecipe", "ParallelConverter", "parallel_neuron_factory", "conversion_case"]

MODES = ("auto", "qcfs", "relu")


def conversion_case(gm: fx.GraphModule, T: Union[int, Callable[[str], int]], mode: str = "auto") -> Dict[str, Any]:
    """Which of the paper's three cases applies (Table 2) to a prepared graph.

    Returns ``{"source": "qcfs"|"relu", "record_max": bool, "calibrate": bool}``.
    """
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
        return {"source": "qcfs", "record_max": False, "calibrate": not lossless}
    return {"source": "relu", "record_max": True, "calibrate": True}


class ParallelConversionRecipe(FXConversionRecipe):
    """Convert a QCFS or ReLU ANN into a parallel-spiking SNN running ``T`` time steps.

    Args:
        T: inference time steps (int >= 1), or a dict mapping activation-site names to their T
            (per-layer time steps; unnamed sites use ``default_T``).
        dataloader: calibration batches (tensors, ``(x, y)`` tuples or dicts); needed unless the
            ANN is a QCFS network with ``L == T`` everywhere.
        mode: ``"auto"`` (QCFS if the model has QCFS modules, else ReLU), ``"qcfs"`` or ``"relu"``.
        calibrate: run Algorithm 1; ``None`` (default) does so exactly when the case needs it.
        alpha: EMA momentum of Algorithm 1 (paper: 0.99 over one epoch).
        bias_correction: divide the EMAs by ``1 - alpha**n`` (see :class:`~.observers.DACalibrator`).
        num_batches: at most this many calibration batches per pass.
        fuse_bn: fold BatchNorm into the preceding convolution (:func:`~.tracing.fold_bn`).
        backend, spike_order: passed to every :class:`~.ParallelConversionNode`.
        progress: show tqdm progress bars.
        reducer: ``reducer(tensor, op)`` summing/maxing statistics across processes (distributed).
        default_T: T of sites missing from a per-layer ``T`` dict.
        method: ``"ema"`` (Algorithm 1 as published) or ``"moment"`` (per-channel moment
            matching of ``phi_da`` and ``psi_da``; an alternative at T <= 4, measured in the docs).
    """

    def __init__(
        self,
        T: Union[int, Dict[str, int]],
        dataloader: Optional[Iterable] = None,
        mode: str = "auto",
        calibrate: Optional[bool] = None,
        alpha: float = 0.99,
        bias_correction: bool = True,
        num_batches: Optional[int] = None,
        fuse_bn: bool = True,
        backend: str = "auto",
        spike_order: str = "late",
        progress: bool = True,
        reducer: Optional[Callable] = None,
        default_T: Optional[int] = None,
        method: str = "ema",
        analog_sites=(),
    ) -> None:
        self.T = T
        self.dataloader = dataloader
        self.mode = mode
        self.calibrate_option = calibrate
        self.alpha = alpha
        self.bias_correction = bias_correction
        self.num_batches = num_batches
        self.fuse_bn = fuse_bn
        self.backend = backend
        self.spike_order = spike_order
        self.progress = progress
        self.reducer = reducer
        self.default_T = default_T
        self.method = method
        self.analog_sites = tuple(analog_sites)
        self.case: Optional[Dict[str, Any]] = None
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
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.calibrate_option not in (None, True, False):
            raise ValueError(f"calibrate must be None, True or False, got {self.calibrate_option!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha < 1.0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a number in [0, 1), got {self.alpha!r}")
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int)
                                             or self.num_batches < 1):
            raise ValueError(f"num_batches must be None or an integer >= 1, got {self.num_batches!r}")
        if self.backend not in kernels.BACKENDS:
            raise ValueError(f"backend must be one of {kernels.BACKENDS}, got {self.backend!r}")
        if self.spike_order not in ("late", "early"):
            raise ValueError(f"spike_order must be 'late' or 'early', got {self.spike_order!r}")
        if self.method not in ("ema", "moment"):
            raise ValueError(f"method must be 'ema' or 'moment', got {self.method!r}")

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
        return ann

    def after_trace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        fx_model = activation_calls_to_modules(fx_model)
        if self.fuse_bn:
            fx_model = fold_bn(fx_model)
        fx_model = prepare_graph(fx_model)
        if self.analog_sites:
            keep_analog(fx_model, self.analog_sites)
        if isinstance(self.T, dict):
            names = {n.target for n in activation_sites(fx_model)}
            unknown = sorted(set(self.T) - names)
            if unknown:
                raise ValueError(f"per-layer T names unknown activation sites {unknown}; sites are {sorted(names)}")
            for n in names:
                self.T_of(n)
        case = conversion_case(fx_model, self.T_of, self.mode)
        if self.calibrate_option is not None:
            case["calibrate"] = self.calibrate_option
        if (case["calibrate"] or case["record_max"]) and self.dataloader is None:
            why = "records per-channel maxima of a ReLU network" if case["record_max"] else \
                "calibrates DA-QCFS because T differs from the QCFS level L"
            raise ValueError(f"ParallelConversionRecipe {why}: pass dataloader=... with calibration data")
        self.case = case
        return fx_model.to(converter.device)

    def insert_observers(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        if self.case["record_max"]:
            calibration.replace_sites(
                fx_model, lambda _, m: MaxObserver(m, reducer=self.reducer) if isinstance(m, (nn.ReLU, ClipReLU)) else m)
        return fx_model

    def calibrate(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        dev = converter.device
        if self.case["record_max"]:
            fx_model.eval()
            with torch.no_grad():
                for x in calibration.iterate_inputs(self.dataloader, dev, self.num_batches,
                                                    "recording thresholds", self.progress):
                    fx_model(x)
            calibration.replace_sites(fx_model, lambda _, m: m.to_clip_relu() if isinstance(m, MaxObserver) else m)
        if self.case["calibrate"]:
            calibration.calibrate_da(fx_model, self.dataloader, self.T_of, dev, self.num_batches, self.alpha,
                                     self.bias_correction, self.progress, self.reducer, self.method)
        else:
            calibration.to_daqcfs(fx_model, self.T_of)
        return fx_model

    def replace(self, converter: FXConverter, fx_model: fx.GraphModule) -> fx.GraphModule:
        calibration.to_nodes(fx_model, backend=self.backend, spike_order=self.spike_order)
        fx_model = insert_time_joins(to_multistep(fx_model))
        return fx_model.to(converter.device)

    def finalize(self, converter: FXConverter, fx_model: fx.GraphModule) -> nn.Module:
        functional.set_step_mode(fx_model, "m")
        fx_model.eval()
        return fx_model


class ParallelConverter(FXConverter):
    """``ann2snn.FXConverter`` that also accepts registered recipe names.

    ``ParallelConverter("parallel", T=4, dataloader=loader).convert(ann)`` and
    ``ann2snn.Converter(ParallelConversionRecipe(4, loader)).convert(ann)`` are the same.
    """

    def __init__(self, recipe: Union[str, FXConversionRecipe] = "parallel",
                 device: Optional[Union[str, torch.device]] = None, **recipe_options: Any) -> None:
        if isinstance(recipe, str):
            recipe = registry.get_recipe(recipe, **recipe_options)
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
    """
    def factory(scale: float) -> ParallelConversionNode:
        return ParallelConversionNode(T, v_threshold=1.0, **node_kwargs)

    return factory


registry.register_recipe("parallel", ParallelConversionRecipe)
