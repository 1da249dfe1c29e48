"""The error a model that cannot be converted exactly raises, and how it names graph nodes.

:class:`GraphConversionError` carries one :class:`GraphProblem` per unsupported operation, so a
user sees every blocker of a model at once; :func:`describe` and :func:`owner_path` name a node
and the module it sits in.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

from torch import fx

__all__ = ["GraphConversionError", "GraphProblem", "describe", "owner_path", "owner_prefix"]


@dataclasses.dataclass(frozen=True)
class GraphProblem:
    """One operation of a model that parallel conversion cannot convert exactly.

    ``node``: the graph node's name; ``kind``: what it is (``"module LayerNorm"``,
    ``"function gelu"``, ``"method .softmax()"``, ``"batch axis"``, ``"product of tensors"``,
    ...); ``module``: the path of the module it sits in (``""`` for the top level);
    ``message``: the full one-line description.
    """

    node: str
    kind: str
    module: str
    message: str

    def __str__(self) -> str:
        return self.message


class GraphConversionError(ValueError):
    """A model that parallel conversion cannot handle exactly, found before any calibration.

    ``problems`` lists every unsupported operation (:class:`GraphProblem`); the message's first
    line summarises them, one further line per problem follows. Errors that are not about single
    graph nodes (SpikingJelly's step-mode adapter refusing the model) hold one problem with an
    empty ``node``.
    """

    def __init__(self, message: str, problems: Sequence[GraphProblem] = ()) -> None:
        super().__init__(message)
        self.problems: Tuple[GraphProblem, ...] = tuple(problems)

    @classmethod
    def from_problems(cls, problems: Sequence[GraphProblem]) -> "GraphConversionError":
        """One error for ``problems``: a summary line by kind, then one line per problem."""
        if len(problems) == 1:
            return cls(f"cannot convert: {problems[0].message}", problems)
        by_kind: Dict[str, List[GraphProblem]] = {}
        for p in problems:
            by_kind.setdefault(p.kind, []).append(p)
        parts = []
        for kind, ps in by_kind.items():
            where = sorted({p.module or "the top-level forward" for p in ps},
                           key=[p.module or "the top-level forward" for p in ps].index)
            more = f", +{len(where) - 2} more" if len(where) > 2 else ""
            parts.append(f"{kind} x{len(ps)} (in {', '.join(where[:2])}{more})")
        kinds = f"{len(by_kind)} kind" + ("s" if len(by_kind) > 1 else "")
        summary = (f"cannot convert: {len(problems)} unsupported operations of {kinds}: "
                   + "; ".join(parts))
        return cls("\n".join([summary] + [f"  {p.message}" for p in problems]), problems)


def describe(node: fx.Node) -> str:
    """'graph node X (op target) from module Y' for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    owner = None
    if stack:
        path, (_, cls) = list(stack.items())[-1]
        owner = f"{path.split('@')[0] or '<root>'} ({getattr(cls, '__name__', cls)})"
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    tgt = node.meta.get("sjpc_written_as", tgt)
    where = f" in module {owner}" if owner else " in the model's own forward"
    return f"graph node '{node.name}' ({node.op} {tgt}){where}"


def owner_prefix(node: fx.Node) -> str:
    """Path of the module that holds ``node`` (a module call: its parent)."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.keys())[-1].split("@")[0]


def owner_path(node: fx.Node) -> str:
    """Path of the module a node sits in (its own for a module call)."""
    if node.op == "call_module":
        return node.target
    return owner_prefix(node)
