"""The root of a converted network: a ``torch.fx.GraphModule`` that is also a SpikingJelly step module.

SpikingJelly's ``functional.set_step_mode(net, mode)`` walks the module tree depth first from the
root and switches every step module as it reaches it. A module that refuses the mode halfway
(a :class:`~sj_parallel_conversion.ParallelConversionNode` refuses ``"s"``) would leave the
modules before it switched, and the network would fail later on a shape error far from the cause.
The root is reached first, so a root whose ``step_mode`` setter checks every step module below
refuses a mode before any module is switched. Converted networks get this root at the end of
conversion (:class:`~sj_parallel_conversion.ParallelConversionRecipe`) and when loaded
(:func:`~sj_parallel_conversion.load_snn`); copies and pickles keep it.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn
from spikingjelly.activation_based import base, functional, layer
from torch import fx

__all__ = ["FIXED_IN_EVAL", "ConvertedNetwork", "as_converted_network"]

_MODES = ("s", "m")
#: Layers that compute differently in training mode; a converted network keeps them in eval mode.
#: SpikingJelly's BatchNorm layers subclass torch's; its dropout layers do not.
FIXED_IN_EVAL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.Dropout, nn.Dropout1d,
                 nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, layer.Dropout,
                 layer.Dropout2d)


class ConvertedNetwork(fx.GraphModule, base.StepModule):
    """A ``GraphModule`` whose step mode is set all at once or not at all.

    ``supported_step_mode()`` is the set of modes every step module below supports. Setting
    ``step_mode`` (as ``functional.set_step_mode`` does on the root first) raises ``ValueError``
    naming the first module that does not support the mode, with no module switched; otherwise it
    switches every module below as ``functional.set_step_mode`` would. Reading it gives the mode
    all step modules below share, or ``None`` when they differ.

    A step module inside one of SpikingJelly's containers that keep their children's modes counts
    as well, so such a network may refuse a mode that ``set_step_mode`` alone would have skipped
    there; converted networks hold no such containers.
    """

    def _step_modules(self):
        return [(name, m) for name, m in self.named_modules() if m is not self and isinstance(m, base.StepModule)]

    def supported_step_mode(self) -> Tuple[str, ...]:
        modes = set(_MODES)
        for _, m in self._step_modules():
            modes &= set(m.supported_step_mode())
        return tuple(mode for mode in _MODES if mode in modes)

    @property
    def step_mode(self) -> Optional[str]:
        modes = {m.step_mode for _, m in self._step_modules()}
        return modes.pop() if len(modes) == 1 else None

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        for name, m in self._step_modules():
            if value not in m.supported_step_mode():
                explain: Optional[Callable[[str], str]] = getattr(m, "step_mode_refusal", None)
                reason = explain(value) if callable(explain) else (
                    f"{type(m).__name__} supports step modes {m.supported_step_mode()}, not {value!r}")
                raise ValueError(f"{reason} (module {name!r}; no module of the network was switched)")
        # Modules outside the StepModule contract are not checked above: restore all if one refuses.
        before: Dict[nn.Module, str] = {m: m.step_mode for m in self.modules()
                                        if m is not self and hasattr(m, "step_mode")}
        try:
            for child in self.children():
                functional.set_step_mode(child, value)
        except Exception:
            for m, mode in before.items():
                m.step_mode = mode
            raise

    def train(self, mode: bool = True) -> "ConvertedNetwork":
        """Set the training flag of every module, except BatchNorm and dropout layers, which stay
        in eval mode.

        A converted network is inference-only (the neuron's backward raises). In training mode a
        kept BatchNorm (QCFS networks keep theirs) would normalise by each batch of spike-driven
        currents and overwrite its running statistics, and dropout would drop spikes: code that
        calls ``net.train()`` as a matter of course would change the network for good.
        """
        super().train(mode)
        for m in self.modules():
            if isinstance(m, FIXED_IN_EVAL):
                m.training = False
        return self

    def __reduce__(self):
        # GraphModule pickles rebuild a plain GraphModule; adopt the rebuilt one again.
        rebuild, args = super().__reduce__()
        return _unpickle, (rebuild, args)


def _unpickle(rebuild: Callable, args: tuple) -> "ConvertedNetwork":
    return as_converted_network(rebuild(*args))


def as_converted_network(gm: fx.GraphModule) -> ConvertedNetwork:
    """Make ``gm`` a :class:`ConvertedNetwork` in place (and return it), keeping its modules,
    attributes, graph and class name; one already is is returned as it is."""
    if isinstance(gm, ConvertedNetwork):
        return gm
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"as_converted_network expects a torch.fx.GraphModule, got {type(gm).__name__}")
    name = type(gm).__name__
    # Every GraphModule has a class of its own, where recompile() installs its forward; give it a
    # fresh one below ConvertedNetwork, named as fx names them so that copies make their own too.
    own = type("GraphModuleImpl", (ConvertedNetwork,), {})
    own.__name__ = name
    gm.__class__ = own
    gm.recompile()
    return gm
