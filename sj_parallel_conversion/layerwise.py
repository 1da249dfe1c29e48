"""Per-layer time steps (the idea of PASCAL): a different ``T`` for each activation site.

Every :class:`~sj_parallel_conversion.ParallelConversionNode` accepts any number of input steps,
so neighbouring layers may run different ``T``; ``ParallelConversionRecipe(T={site: T, ...})``
builds such a network. :func:`search_layer_T` picks the per-layer ``T`` greedily: starting from
a uniform ``T_max`` it lowers the ``T`` of the layers that drive the most synaptic operations
first, keeping each change only while the count-domain accuracy on the search data stays within
``max_loss`` of the uniform network's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import fx
from torch.utils.data import RandomSampler

from . import patterns
from .inference import count_domain_model, count_inference, evaluate
from .neuron import ParallelConversionNode
from .recipe import ParallelConversionRecipe, ParallelConverter, with_calibration
from .stats import macs

__all__ = ["LayerTSearch", "search_layer_T", "effective_T", "site_weights"]

# The layers whose work a site's spikes drive: those spike statistics count (the pattern table).
_SYNAPTIC = patterns.module_types(lambda p: p.spikes == patterns.SYNAPSE)


def site_weights(snn: fx.GraphModule, x: torch.Tensor) -> Dict[str, float]:
    """Synaptic work each activation site drives: the MACs (per image) of the conv/linear layers
    its spikes feed, through pooling, padding, reshaping, sums and concatenation."""
    modules = dict(snn.named_modules())
    consumers: Dict[str, List[str]] = {}

    def feeds(node: fx.Node, seen=None) -> List[str]:
        seen = set() if seen is None else seen
        out = []
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            m = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(m, _SYNAPTIC):
                out.append(user.target)
            elif isinstance(m, ParallelConversionNode):
                continue
            else:
                out.extend(feeds(user, seen))
        return out

    for node in snn.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), ParallelConversionNode):
            consumers[node.target] = feeds(node)
    layer_macs: Dict[str, float] = {}
    hooks = []
    for name, m in snn.named_modules():
        if isinstance(m, _SYNAPTIC):
            def hook(mod, inp, out, name=name):
                layer_macs[name] = macs(mod, out)
            hooks.append(m.register_forward_hook(hook))
    try:
        count_inference(snn, x[:1])  # one image: the MACs are per image
    finally:
        for h in hooks:
            h.remove()
    return {site: float(sum(layer_macs.get(c, 0.0) for c in cs)) for site, cs in consumers.items()}


def effective_T(T: Dict[str, int], weights: Optional[Dict[str, float]] = None) -> float:
    """Mean ``T`` over sites, weighted by ``weights`` (e.g. :func:`site_weights`) when given."""
    if not T:
        raise ValueError("no activation sites")
    if weights is None:
        return sum(T.values()) / len(T)
    total = sum(weights.get(k, 0.0) for k in T)
    if total <= 0:
        return sum(T.values()) / len(T)
    return sum(T[k] * weights.get(k, 0.0) for k in T) / total


@dataclass
class LayerTSearch:
    T: Dict[str, int]
    accuracy: float
    uniform_T: int
    uniform_accuracy: float
    mean_T: float
    weighted_T: float
    weights: Dict[str, float]
    trials: List[Dict] = field(default_factory=list)

    def to_text(self) -> str:
        from tabulate import tabulate

        rows = [[k, v, f"{self.weights.get(k, 0):.3g}"] for k, v in self.T.items()]
        head = (f"uniform T={self.uniform_T}: accuracy {100 * self.uniform_accuracy:.2f}%\n"
                f"per-layer T: accuracy {100 * self.accuracy:.2f}%, mean T {self.mean_T:.2f}, "
                f"SOP-weighted T {self.weighted_T:.2f}\n")
        return head + tabulate(rows, headers=["site", "T", "driven MACs/img"], tablefmt="github")


def _convert(ann, T, calib, num_batches, device, options):
    rec = ParallelConversionRecipe(T, calib, progress=False, **with_calibration(options, num_batches=num_batches))
    return ParallelConverter(rec, device=device).convert(copy.deepcopy(ann))


def search_layer_T(
    ann: nn.Module,
    calib_loader: Iterable,
    search_loader: Iterable,
    T_max: int = 16,
    candidates: Sequence[int] = (1, 2, 4, 8),
    max_loss: float = 0.01,
    num_calib_batches: Optional[int] = None,
    num_search_batches: Optional[int] = None,
    device="cpu",
    recipe_options: Optional[Dict] = None,
) -> LayerTSearch:
    """Greedy per-layer ``T`` for at most ``max_loss`` (fraction) accuracy loss vs uniform ``T_max``.

    Sites are visited in decreasing order of the synaptic work they drive; for each, the smallest
    candidate below its current ``T`` that keeps the loss within budget is kept. Both loaders must
    yield the same batches on every pass (a shuffling ``DataLoader`` is rejected), so every trial
    is calibrated and scored on the same images and the search is reproducible.
    """
    if any(t < 1 for t in candidates) or T_max < 1:
        raise ValueError("time steps must be >= 1")
    for name, loader in (("calib_loader", calib_loader), ("search_loader", search_loader)):
        if isinstance(getattr(loader, "sampler", None), RandomSampler):
            raise ValueError(f"{name} shuffles on every pass, so each trial would see different images; pass a "
                             "loader with a fixed order (shuffle once, e.g. with a seeded permutation, then "
                             "shuffle=False)")
    if not 0 <= max_loss < 1:
        raise ValueError(f"max_loss is a fraction in [0, 1), got {max_loss}")
    options = dict(recipe_options or {})
    # Every trial is a full conversion: Algorithm 1 keeps the search affordable (the learned and
    # auto methods fit for minutes each); convert the chosen assignment with any method afterwards.
    options.setdefault("method", "ema")
    ann = ann.eval()

    def acc_of(snn):
        counted = count_domain_model(snn)  # one per candidate network, not one per batch
        with torch.no_grad():
            return evaluate(counted, search_loader, device=device, num_batches=num_search_batches,
                            progress=False)[0]

    uniform = _convert(ann, T_max, calib_loader, num_calib_batches, device, options)
    base_acc = acc_of(uniform)
    sites = [n for n, m in uniform.named_modules() if isinstance(m, ParallelConversionNode)]
    from .calibration import iterate_inputs

    probe = next(iter(iterate_inputs(search_loader, device, 1, progress=False)))
    weights = site_weights(uniform, probe)
    T = {s: T_max for s in sites}
    trials = [{"T": dict(T), "accuracy": base_acc, "kept": True}]
    best_acc = base_acc
    for site in sorted(sites, key=lambda s: -weights.get(s, 0.0)):
        for cand in sorted(c for c in candidates if c < T[site]):
            trial = dict(T, **{site: cand})
            acc = acc_of(_convert(ann, trial, calib_loader, num_calib_batches, device, options))
            ok = base_acc - acc <= max_loss
            trials.append({"T": trial, "accuracy": acc, "kept": ok})
            if ok:
                T, best_acc = trial, acc
                break
    return LayerTSearch(T=T, accuracy=best_acc, uniform_T=T_max, uniform_accuracy=base_acc,
                        mean_T=effective_T(T), weighted_T=effective_T(T, weights), weights=weights, trials=trials)
