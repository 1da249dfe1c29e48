"""Multi-step wrapping: the converted graph's stateless layers as SpikingJelly step modules.

SpikingJelly's own step-mode adapter does the wrapping; the pattern table (:mod:`~.patterns`)
says which module types it wraps (those with a ``twin``), which it leaves as they are
(activation sites, which neurons replace, and elementwise modules) and which functions it may
pass on unchanged.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from spikingjelly.activation_based.ann2snn.recipes.step_mode_adapters import adapt_step_mode_graph
from torch import fx

from .patterns import AS_IS, FUNCTION_PATTERNS, REPLACED, WRAPPED, module_types

__all__ = ["to_multistep", "step_tensor_op_type", "WRAPPED_TYPES", "AS_IS_TYPES"]

#: The torch layers the adapter swaps for their SpikingJelly twin.
WRAPPED_TYPES = module_types(lambda p: p.multistep == WRAPPED and p.accepted, twins=False)
#: Modules the adapter leaves as they are: activation sites (neurons replace them) and elementwise ones.
AS_IS_TYPES = module_types(lambda p: p.multistep in (REPLACED, AS_IS), twins=False)
# Functions the table runs as they are on [T, N, ...] that the adapter does not pass on by itself.
_AS_IS_FUNCTIONS = tuple(p.target for p in FUNCTION_PATTERNS if p.multistep == AS_IS)


def to_multistep(gm: fx.GraphModule) -> fx.GraphModule:
    """Wrap stateless layers as SpikingJelly step modules (SpikingJelly's own adapter)."""
    return adapt_step_mode_graph(
        gm,
        context="ParallelConversionRecipe step-mode adapter",
        wrap_module_types=WRAPPED_TYPES,
        safe_module_types=AS_IS_TYPES,
        safe_call_functions=_AS_IS_FUNCTIONS,
    )


@functools.lru_cache(maxsize=None)
def step_tensor_op_type() -> type:
    """The class of the step modules SpikingJelly's adapter writes for tensor operations (flatten,
    reshape, cat, ...), which SpikingJelly does not export: found by letting the adapter wrap one."""

    class _Probe(nn.Module):
        def forward(self, x):
            return torch.flatten(x, 1)

    probe = adapt_step_mode_graph(fx.symbolic_trace(_Probe()), context="step tensor op probe",
                                  wrap_module_types=(), safe_module_types=(), safe_call_functions=())
    found = [type(m) for m in probe.modules() if m is not probe and type(m) is not nn.Module]
    if len(found) != 1:
        raise RuntimeError(f"SpikingJelly's step-mode adapter wrote {found} for one flatten; expected one module")
    return found[0]
