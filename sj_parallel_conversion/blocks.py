"""Blocks of a traced network, for block-wise reconstruction.

A block boundary is an activation site after which the site's output is the only value still
needed by the rest of the graph: everything downstream is then a function of that one tensor,
so the network is the composition of its blocks. In a residual network the boundaries are the
activations that close each residual block (the skip path has merged); in a plain chain every
site is one. :func:`split_blocks` cuts a graph there and returns each stretch as a small
:class:`torch.fx.GraphModule` that shares its modules (and so its parameters) with the network.
"""
from __future__ import annotations

from typing import Collection, List, Optional, Tuple

from torch import fx

__all__ = ["block_boundaries", "split_blocks"]


def block_boundaries(gm: fx.GraphModule, site_names: Collection[str]) -> List[str]:
    """Names of the graph nodes calling one of ``site_names`` whose output alone is live after them."""
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return []
    position = {n: i for i, n in enumerate(nodes)}
    # get_attr nodes are constants of the module, not values flowing through the cut.
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes if n.op != "get_attr"}
    names = set(site_names)
    cuts: List[str] = []
    live: set = set()
    for i, n in enumerate(nodes):
        if n in last_use:
            live.add(n)
        live = {m for m in live if last_use[m] > i}
        if n.op == "call_module" and n.target in names and live == {n}:
            cuts.append(n.name)
    return cuts


def _stretch(gm: fx.GraphModule, start: Optional[str], end: Optional[str]) -> fx.GraphModule:
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    position = {n: i for i, n in enumerate(nodes)}
    output = next(n for n in nodes if n.op == "output")
    first = by_name[start] if start is not None else next(n for n in nodes if n.op == "placeholder")
    graph = fx.Graph()
    env = {first: graph.placeholder("x")}

    def look(m: fx.Node) -> fx.Node:
        if m not in env:
            if m.op != "get_attr":
                raise ValueError(f"block {start!r}..{end!r} reads {m.name!r}, computed before the block starts")
            env[m] = graph.node_copy(m, look)
        return env[m]

    last = position[by_name[end]] if end is not None else position[output] - 1
    for n in nodes[position[first] + 1:last + 1]:
        if n.op in ("placeholder", "output"):
            continue
        env[n] = graph.node_copy(n, look)
    if end is not None:
        graph.output(env[by_name[end]])
    else:
        graph.output(fx.map_arg(output.args[0], look))
    return fx.GraphModule(gm, graph)


def split_blocks(gm: fx.GraphModule, site_names: Collection[str],
                 boundaries: Optional[List[str]] = None) -> List[Tuple[str, fx.GraphModule]]:
    """``[(name, block), ...]``: ``gm`` cut at ``boundaries`` (default :func:`block_boundaries`).

    Each block takes the previous block's output (the first takes the network's input) and the
    last returns the network's output; running them in order computes ``gm``. Blocks share
    their submodules with ``gm``. A block is named after the site that closes it, the last one
    ``"output"``. A graph with no boundary (several inputs, or no single-value cut) is one block.
    """
    cuts = block_boundaries(gm, site_names) if boundaries is None else list(boundaries)
    if not cuts:
        return [("output", gm)]
    ends: List[Optional[str]] = list(cuts) + [None]
    starts: List[Optional[str]] = [None] + list(cuts)
    targets = {n.name: str(n.target) for n in gm.graph.nodes}
    return [(targets[end] if end is not None else "output", _stretch(gm, start, end)) for start, end in zip(starts, ends)]
