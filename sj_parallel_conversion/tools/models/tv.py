"""torchvision ResNets with weights from a local file.

torchvision's ``BasicBlock`` / ``Bottleneck`` call one ``self.relu`` module two or three times per
block; the conversion's graph canonicalisation (:mod:`~sj_parallel_conversion.canonicalise`) gives
each call its own neuron, so the model is converted as torchvision builds it.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

__all__ = ["torchvision_resnet"]

DEPTHS = (18, 34, 50, 101)


def torchvision_resnet(depth: int, num_classes: int = 1000, weights_path: Optional[str] = None) -> nn.Module:
    """``torchvision.models.resnet{depth}(weights=None)``, its weights loaded (strictly) from the
    local state_dict file ``weights_path`` if given. Nothing is downloaded."""
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {list(DEPTHS)}, got {depth!r}")
    from torchvision.models import resnet as tv_resnet  # torchvision takes seconds to import: only here

    model = getattr(tv_resnet, f"resnet{depth}")(weights=None, num_classes=num_classes)
    if weights_path is not None:
        from ...fileio import load_tensor_file
        from .user import extract_state_dict, state_dict_mismatch

        state = extract_state_dict(load_tensor_file(weights_path, what="weights file"), model=model)
        problem = state_dict_mismatch(model, state)
        if problem:
            raise ValueError(f"weights {weights_path!r} do not match torchvision resnet{depth} "
                             f"(num_classes={num_classes}): {problem}")
        model.load_state_dict(state, strict=True)
    return model
