"""The run-time batch-axis check: what the static validation took on trust, measured on data.

A converted network runs its time steps through the batch axis, so no operation may move or mix
axis 0. :func:`~.validation.validate_graph` does not know shapes and takes a leading ``-1`` in a
reshape and negative axes on trust; :func:`check_batch_axis` runs the prepared graph on two or
three images and refuses every per-sample tensor whose axis 0 is no longer the batch.
"""
from __future__ import annotations

from typing import List

import torch
from torch import fx

from .fx_nodes import module_device
from .graph_errors import GraphConversionError, GraphProblem, describe, owner_path
from .validation import BATCH_AXIS_HINT, TENSOR, value_kinds

__all__ = ["check_batch_axis"]


class _BatchAxisChecker(fx.Interpreter):
    """Runs a prepared graph and records per-sample tensors whose axis 0 is not the batch."""

    def __init__(self, gm: fx.GraphModule, batch: int):
        super().__init__(gm)
        self.batch = batch
        self.kinds = value_kinds(gm)
        self.problems: List[GraphProblem] = []

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if (self.kinds.get(n) == TENSOR and n.op != "placeholder" and torch.is_tensor(out)
                and (out.dim() == 0 or out.shape[0] != self.batch)):
            shape = tuple(out.shape)
            self.problems.append(GraphProblem(
                n.name, "batch axis", owner_path(n),
                f"{describe(n)}: turns a batch of {self.batch} into shape {shape}; {BATCH_AXIS_HINT}"))
        return out


def check_batch_axis(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Run ``gm`` on (at least) two images of ``x`` and refuse any op that changes the batch axis.

    The static check in :func:`~.validation.validate_graph` does not know shapes, so it takes a
    leading ``-1`` in a reshape and negative axes on trust; this catches those where they do reach
    the batch axis, before calibration. Raises :class:`GraphConversionError` listing every such node.
    """
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"check_batch_axis expects a batch tensor [N, ...], got {getattr(x, 'shape', type(x))}")
    # Two different images (the first one and its negation where the batch has one): a batch of 1
    # would hide an op that merges the batch into another axis.
    x = x[:3] if x.shape[0] >= 2 else torch.cat([x[:1], -x[:1]])
    where = module_device(gm, x.device)
    checker = _BatchAxisChecker(gm, x.shape[0])
    with torch.no_grad():
        checker.run(x.to(where))
    if checker.problems:
        raise GraphConversionError.from_problems(checker.problems)
