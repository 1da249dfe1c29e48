"""Graph preparation for parallel conversion: :func:`prepare_graph` runs the passes in order.

1. canonicalisation (:mod:`~.canonicalise`): activation sites as modules, functional forms as
   modules, max pools after activations;
2. static validation (:mod:`~.validation`) against the pattern table (:mod:`~.patterns`): one
   :class:`~.graph_errors.GraphConversionError` listing every node that does not commute with
   the time mean or touches the batch axis;
3. a dry run of the multi-step wrapping (:mod:`~.multistep`), so that SpikingJelly's adapter,
   too, refuses a model before any calibration.

The run-time batch-axis check is :mod:`~.batch_axis`; the step modules the passes write are
:mod:`~.step_modules`. The names below stay importable from here, as they were before the passes
had modules of their own.
"""
from __future__ import annotations

import copy

from torch import fx

from .batch_axis import check_batch_axis
from .canonicalise import canonicalise, move_maxpools_after_activations, views_to_reshapes
from .graph_errors import GraphConversionError, GraphProblem, describe  # noqa: F401 (describe: old home)
from .multistep import to_multistep
from .sites import ACTIVATION_TYPES, activation_sites, is_activation_site, keep_analog  # noqa: F401
from .step_modules import AnalogReLU, ChunkPart, ConstantScale, StepPad
from .validation import validate_graph

__all__ = [
    "AnalogReLU",
    "ChunkPart",
    "ConstantScale",
    "GraphConversionError",
    "GraphProblem",
    "StepPad",
    "activation_sites",
    "check_batch_axis",
    "is_activation_site",
    "keep_analog",
    "prepare_graph",
    "to_multistep",
    "validate_graph",
]


def prepare_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Canonicalise activation sites, module-ise functional ops, reorder pools, then validate."""
    canonicalise(gm)
    move_maxpools_after_activations(gm)
    validate_graph(gm)
    views_to_reshapes(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # Dry-run SpikingJelly's step-mode adapter on a copy so that its rejections, too, come
    # before any calibration work.
    try:
        to_multistep(copy.deepcopy(gm))
    except (ValueError, TypeError) as exc:
        msg = f"SpikingJelly's step-mode adapter rejects this model: {exc}"
        raise GraphConversionError(msg, [GraphProblem("", "step-mode adapter", "", msg)]) from exc
    return gm
