"""Memory reuse in converted networks: which intermediate tensors may be overwritten.

A spike-level run carries ``T x N`` images through every layer, so each intermediate tensor is
large, and on CPU a freshly allocated one costs a page fault per 4 KiB before the first value is
written (as much time as the convolution's own writes for the large early layers). A tensor that
a layer made and that only one reader ever sees can instead take that reader's result:

* a neuron reading such a tensor writes its spikes over the currents
  (:attr:`ParallelConversionNode.inplace`);
* a residual sum adds its other operand into it (:func:`accumulate`).

:func:`reuse_memory` finds these places in a converted graph; :func:`count_domain_model` uses the
same test for its neurons. The results are the same bits as without reuse. What changes is what a
hook that *keeps* a reference sees afterwards: a SpikingJelly ``OutputMonitor`` on convolutions or
an ``InputMonitor`` on neurons records tensors that are overwritten later in the forward pass
(pass a ``function_on_output``/``function_on_input`` that clones, or convert with
``inplace=False``). Monitors of the neurons' outputs (spikes) are unaffected: spikes are never
overwritten.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from . import formulas
from .neuron import ParallelConversionNode

__all__ = ["accumulate", "fresh", "sole_reader", "reuse_memory"]


def accumulate(a: torch.Tensor, b) -> torch.Tensor:
    """``a + b``, written into ``a`` when the sum has ``a``'s shape and dtype and needs no gradient
    (not under ``torch.compile``, which plans memory itself).

    The graph calls it only where ``a`` is a temporary read by nobody else (see :func:`reuse_memory`).
    Elsewhere, for example a one-step operand broadcast against a ``T``-step one, or under
    ``torch.compile``, it returns a new tensor, as ``a + b`` does.
    """
    if torch.compiler.is_compiling():
        # torch.compile plans memory itself, and dynamo cannot trace the test below (result_type
        # returns a dtype): the plain sum keeps fullgraph=True working.
        return a + b
    if (torch.is_tensor(a) and not formulas.needs_grad(a, b)
            and torch.result_type(a, b) == a.dtype
            and (not torch.is_tensor(b) or (b.device == a.device
                                           and torch.broadcast_shapes(a.shape, b.shape) == a.shape))):
        return a.add_(b)
    return a + b


# Only a tensor that its producer made new (no view of or alias for another one), read by nobody
# else, may be overwritten: Identity, Dropout in eval, reshape, getitem or a chunk hand their input
# on, and overwriting it would corrupt another reader. The pattern table says which modules and
# functions make new tensors (``fresh``).
_SUMS = (operator.add, torch.add)


def fresh(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether graph node ``n`` produces a new tensor (no view of or alias for another one)."""
    from .patterns import function_pattern, module_pattern  # the table lists accumulate: imported late

    if n.op == "call_module":
        pattern = module_pattern(gm.get_submodule(n.target))
    elif n.op == "call_function" and "out" not in n.kwargs:  # with out=, the out tensor others may read
        pattern = function_pattern(n.target)
    else:
        return False
    return pattern is not None and pattern.fresh


def _temporary(gm: fx.GraphModule, n) -> bool:
    return isinstance(n, fx.Node) and fresh(gm, n) and len(n.users) == 1


def sole_reader(gm: fx.GraphModule, name: str) -> bool:
    """Whether every call of submodule ``name`` reads a freshly made tensor nobody else reads."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    return bool(calls) and all(len(c.args) == 1 and not c.kwargs and _temporary(gm, c.args[0]) for c in calls)


def reuse_memory(gm: fx.GraphModule) -> fx.GraphModule:
    """Let a converted graph overwrite its temporaries (modifies and returns ``gm``).

    Every two-operand sum with an operand that is a temporary read only by the sum becomes
    :func:`accumulate` into that operand, and every :class:`ParallelConversionNode` that is the
    sole reader of its input gets ``inplace = True``. The outputs keep their bits.
    """
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _SUMS or len(n.args) != 2 or n.kwargs:
            continue
        a, b = n.args
        if _temporary(gm, a):
            n.target = accumulate
        elif _temporary(gm, b):
            # Addition commutes exactly in IEEE arithmetic: b + a has the bits of a + b.
            n.target, n.args = accumulate, (b, a)
    gm.recompile()
    for name, m in gm.named_modules():
        if isinstance(m, ParallelConversionNode) and sole_reader(gm, name):
            m.inplace = True
    return gm
