"""sj-parallel-conversion: parallel ANN-SNN conversion for SpikingJelly 2.x.

Implements Hao, Ma, Chen, Zhang, Yu & Huang, "Faster and Stronger: When ANN-SNN Conversion Meets
Parallel Spiking Calculation" (ICML 2025, arXiv:2412.13610). Public API:

Neuron and activations
    :class:`ParallelConversionNode`  SpikingJelly neuron computing all T steps at once.
    :class:`QCFS`, :class:`ClipReLU`, :class:`DAQCFS`  the ANN-side activations.

Conversion (SpikingJelly ``ann2snn`` flow)
    :class:`ParallelConversionRecipe`  an ``ann2snn.FXConversionRecipe`` for the paper's three cases.
    :class:`CalibrationSettings`, :class:`NetworkSettings`  the recipe's settings beyond ``T``,
    ``dataloader`` and ``method``: how it calibrates, and what the converted network is made of.
    :class:`ParallelConverter`  ``ann2snn.FXConverter`` that also takes the recipe's name and options.
    :func:`parallel_neuron_factory`  drop-in ``neuron_factory`` for SpikingJelly's ``RateCodingRecipe``.
    :class:`GraphConversionError`  raised, before calibration, for unsupported graph patterns.
    :class:`LearnedCalibration`  options of the learned calibration (``method="learned"``).
    :class:`DistillCalibration`  options of the distilled calibration, which also learns the
    weights (``method="distill"``, and the fit ``method="auto"`` tries).
    :class:`CalibrationReport`  what calibration chose and measured (``snn.calibration_report``).

Evaluation
    :func:`count_domain_model`  the converted network as a one-pass module, ``[N, ...]`` -> time mean.
    :func:`count_inference`  ``count_domain_model(snn)(x)`` under ``no_grad``, in one call.
    :func:`spike_inference`  spike-level run on a static input (fed once to parallel networks).
    :func:`predictor`  ``x -> time-mean output``, spike-level (any multi-step SNN) or count-domain.

Files
    :func:`save_snn`, :func:`load_snn`  save a converted network and rebuild it without the ANN,
    data or pickle (tensors and plain containers, loaded with ``weights_only=True``).
    :func:`load_user_model`  any model (zoo name, ``torchvision:NAME``, ``MODULE:CALLABLE``) with
    its weights from a state_dict file, as the CLI's ``--model NAME --weights FILE``.

The modules of this package are the library; :mod:`sj_parallel_conversion.tools` holds what is
built on it (command line, demo, comparison tables and plots, training, model zoo, datasets and
the shipped checkpoints). Importing the package imports no tool: :func:`load_user_model` loads
its module on first use.
"""
from . import _cli_startup  # noqa: F401  (first: Ctrl-C during the imports below, see there)
from .activation import DAQCFS, QCFS, ClipReLU
from .graph import GraphConversionError
from .inference import count_domain_model, count_inference, predictor, spike_inference
from .learned import DistillCalibration, LearnedCalibration
from .neuron import ParallelConversionNode
from .recipe import (CalibrationSettings, NetworkSettings, ParallelConversionRecipe, ParallelConverter,
                     parallel_neuron_factory)
from .selection import CalibrationReport
from .serialization import load_snn, save_snn

__version__ = "0.1.0"

#: Public names that live in :mod:`sj_parallel_conversion.tools` and are imported on first use.
_TOOLS = {"load_user_model": "sj_parallel_conversion.tools.models.user"}

__all__ = [
    "ParallelConversionNode", "QCFS", "ClipReLU", "DAQCFS",
    "ParallelConversionRecipe", "ParallelConverter", "parallel_neuron_factory",
    "CalibrationSettings", "NetworkSettings",
    "GraphConversionError",
    "LearnedCalibration", "DistillCalibration", "CalibrationReport",
    "count_domain_model", "count_inference", "spike_inference", "predictor",
    "save_snn", "load_snn", "load_user_model",
]


def __getattr__(name: str):
    if name in _TOOLS:
        import importlib

        value = getattr(importlib.import_module(_TOOLS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_TOOLS))
