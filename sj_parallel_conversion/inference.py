"""Evaluating converted models: spike-level runs and the count domain.

Every layer between two parallel neurons is linear (convolution, pooling, BN folded, residual
sums, padding, reshaping) or a max pool of sorted trains, so it commutes with the time mean; each
neuron needs only the mean of its input. :func:`count_domain_model` therefore builds a separate
module that runs the converted network once on ``[N, ...]`` input, with every neuron replaced by
its rate ``(spike_value / T) * k``, and gets what the spike-level run's time mean would give at
about the cost of one ANN forward. :func:`evaluate` measures the top-1 accuracy and time of any
``x -> logits`` function (a :func:`predictor`, an ANN) over ``(x, y)`` batches.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn
from spikingjelly.activation_based import base, functional
from spikingjelly.activation_based import neuron as sj_neuron
from torch import fx

from . import reuse
from .calibration import extract_input
from .network import ConvertedNetwork
from .neuron import ParallelConversionNode
from .patterns import module_types
from .progress import progress as progress_bar
from .timing import synchronize

__all__ = ["count_domain_model", "CountDomainNeuron", "count_inference", "spike_inference", "predictor",
           "repeat_input", "evaluate", "evaluation_batches", "check_repeats"]


def _nodes(model: nn.Module):
    nodes = [m for m in model.modules() if isinstance(m, ParallelConversionNode)]
    if not nodes:
        raise ValueError("the model contains no ParallelConversionNode; convert it with ParallelConverter first")
    return nodes


class CountDomainNeuron(nn.Module):
    """A :class:`ParallelConversionNode` in the count domain: ``[N, ...]`` time-mean currents in,
    time-mean output ``(spike_value / T) * k`` out (:meth:`ParallelConversionNode.rate`).

    ``inplace=True`` lets it overwrite its input (:func:`count_domain_model` sets it where the
    graph shows the neuron is the input's only reader), which saves a buffer and a pass over it.
    """

    def __init__(self, node: ParallelConversionNode, inplace: bool = False):
        super().__init__()
        if not isinstance(node, ParallelConversionNode):
            raise TypeError(f"CountDomainNeuron wraps a ParallelConversionNode, got {type(node).__name__}")
        self.node = node
        self.inplace = bool(inplace)

    def forward(self, mean_current: torch.Tensor) -> torch.Tensor:
        return self.node.rate(mean_current, inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"inplace={self.inplace}"


def count_domain_model(snn: nn.Module) -> nn.Module:
    """The count-domain form of a converted network: ``[N, ...]`` input, time-mean output, one pass.

    Returns a new module (a copy: parameters and buffers are copied, and need no gradient: a
    backward from an input that requires one raises, as at spike level; ``snn`` is not modified;
    forward hooks registered on ``snn``'s modules, SpikingJelly monitors included, are copied too
    and fire in the count domain: build it, or call :func:`count_inference`, before attaching
    monitors or after removing them) in which every :class:`ParallelConversionNode` is a :class:`CountDomainNeuron` computing
    ``(spike_value / T) * k`` with the node's own operations, each per-layer-``T`` join
    (:class:`~sj_parallel_conversion.joins.TimeMean`) is the identity (its input already is a time
    mean), and every other SpikingJelly layer is in single-step mode. Its output equals the time
    mean of the spike-level output up to floating-point summation order (see
    :func:`count_inference`); for a lossless QCFS conversion (``T == L``) it reproduces the ANN bit
    for bit. Build it once, after conversion, and call it like the ANN; it works with
    ``torch.compile(..., fullgraph=True)``.

    Raises ``ValueError`` when ``snn`` holds no parallel neuron, or holds another spiking neuron
    (whose state the count domain cannot represent).
    """
    if not isinstance(snn, nn.Module):
        raise TypeError(f"count_domain_model expects an nn.Module, got {type(snn).__name__}")
    _nodes(snn)
    others = sorted({type(m).__name__ for m in snn.modules()
                     if isinstance(m, sj_neuron.BaseNode) and not isinstance(m, ParallelConversionNode)})
    if others:
        raise ValueError(f"count_domain_model: the model holds spiking neurons other than "
                         f"ParallelConversionNode ({', '.join(others)}); it has no count domain")
    model = copy.deepcopy(snn)
    # Inference only, as the spiking network is: with no parameter asking for gradients a
    # compiled forward needs no backward, and one through an input that asks raises.
    model.requires_grad_(False)
    identities = module_types(lambda p: p.mean_identity)
    # Collect first, replace after: replacing while iterating named_modules would skip siblings.
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, ParallelConversionNode):
            inplace = isinstance(model, fx.GraphModule) and reuse.sole_reader(model, name)
            swaps.append((name, CountDomainNeuron(m, inplace=inplace)))
        elif isinstance(m, identities):
            swaps.append((name, nn.Identity()))
    for name, new in swaps:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    for name, m in model.named_modules():
        # The root of a converted network is a step module too, whose modes are its modules' modes: the
        # wrapped nodes stay multi-step, so it is skipped and its modules are set one by one.
        if isinstance(m, (ParallelConversionNode, ConvertedNetwork)) or not isinstance(m, base.StepModule):
            continue
        if "s" not in m.supported_step_mode():
            raise ValueError(f"count_domain_model: module {name!r} ({type(m).__name__}) has no "
                             "single-step mode, so the network has no count domain")
        m.step_mode = "s"
    return model.eval() if not snn.training else model


def count_inference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Time-mean output of a converted model for direct-encoded input ``x`` of shape ``[N, ...]``.

    Runs :func:`count_domain_model` ``(model)`` under ``torch.no_grad()``; for repeated evaluation
    build that module once instead (this builds it at every call). Equals
    ``spike_inference(model, x).mean(0)`` up to floating-point summation order: the spike-level
    run sums ``T`` per-step currents where this one multiplies a rate, so values agree to about
    ``1e-5`` relative in float32, and a count can differ by one where a neuron's input lies within
    rounding distance of a firing boundary (rare; predictions agree).
    """
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"count_inference expects input of shape [N, ...], got {getattr(x, 'shape', type(x))}")
    counted = count_domain_model(model)
    with torch.no_grad():
        return counted(x)


def repeat_input(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: the static input ``[N, ...]`` repeated into ``[T, N, ...]``."""
    return x.unsqueeze(0).expand((T,) + tuple(x.shape)).contiguous()


def spike_inference(model: nn.Module, x: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
    """Spike-level run of a converted model on static input ``x`` of shape ``[N, ...]``.

    Returns the output sequence ``[T_out, N, ...]``. With ``T=None`` (parallel networks only) the
    image is fed once, as one input step (``T_in = 1``): every parallel neuron reads only the time
    mean of its input, and the mean of ``T`` identical copies can round differently from the
    image itself. With an int ``T`` the image is repeated ``T`` times (direct encoding), which
    SpikingJelly's IF networks need.
    """
    if T is None:
        _nodes(model)
        steps = 1
    else:
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be None or an integer >= 1, got {T!r}")
        steps = T
    functional.reset_net(model)
    with torch.no_grad():
        out = model(repeat_input(x, steps))
    functional.reset_net(model)
    return out


def predictor(model: nn.Module, T: Union[int, Dict[str, int], None],
              count_domain: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> time-mean output`` of a converted model on static input ``x``.

    ``count_domain=False``: a spike-level run (:func:`spike_inference`): parallel networks get
    the image once (each neuron emits its own ``T`` steps, so ``T`` may be their per-layer
    dictionary or ``None``); any other multi-step SNN whose state ``functional.reset_net``
    clears, SpikingJelly's IF-neuron conversions included, gets it repeated ``T`` times (an int).
    ``count_domain=True``: the :func:`count_domain_model` of ``model``, built once here (parallel
    neurons only; each neuron uses its own ``T``).
    """
    parallel = any(isinstance(m, ParallelConversionNode) for m in model.modules())
    if not parallel and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
        raise ValueError(f"T must be an integer >= 1 for a network without parallel neurons, got {T!r}")
    if count_domain:
        counted = count_domain_model(model)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return counted(x)
        return run
    if parallel:
        return lambda x: spike_inference(model, x).mean(0)
    return lambda x: spike_inference(model, x, T).mean(0)


def check_repeats(repeats: int, where: str) -> None:
    """``repeats`` (timed calls per batch) is an integer >= 1; ``where`` names the caller."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"{where}: repeats must be an integer >= 1, got {repeats!r}")


def evaluation_batches(loader: Iterable, device, num_batches: Optional[int]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, labels)`` of the first ``num_batches`` batches of ``loader`` on ``device``."""
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("evaluation batches must be (inputs, labels) pairs")
        yield extract_input(batch).to(device), batch[1].to(device)


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, device="cpu",
             num_batches: Optional[int] = None, desc: str = "evaluating", progress: bool = True,
             repeats: int = 1):
    """Top-1 accuracy of ``predict(x) -> logits [N, classes]`` over ``(x, y)`` batches.

    Returns ``(accuracy, images, seconds)``; the time covers ``predict`` calls only, after one
    untimed warm-up call on the first batch (first calls pay for allocation and kernel set-up).
    Every batch is timed ``repeats`` times, and ``seconds`` is the number of images times the
    median per-image time of all these calls, which a brief load spike on a shared machine does
    not move (with one batch and ``repeats=1``: the time of that one call).
    """
    check_repeats(repeats, "evaluate")
    correct = total = 0
    per_image = []
    warm = False
    for x, y in progress_bar(evaluation_batches(loader, device, num_batches), desc, progress):
        if not warm:
            predict(x)
            warm = True
        for _ in range(repeats):
            synchronize(device)  # CUDA runs asynchronously: time the work, not its launch
            t0 = time.perf_counter()
            logits = predict(x)
            synchronize(device)
            per_image.append((time.perf_counter() - t0) / len(x))
        correct += int((logits.argmax(-1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise ValueError("the evaluation loader yielded no batch")
    return correct / total, total, statistics.median(per_image) * total
