"""A user's own model, imported by the CLI as ``--model cli_user_models:factory`` in the tests."""
import torch
import torch.nn as nn


class MeanSign(nn.Module):
    """Predicts from the sign of an image's mean: class 0 for negative inputs, class 9 for positive
    ones (weights from :func:`public_layout_weights`), so the input normalisation decides the class."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def factory(num_classes: int = 10) -> nn.Module:
    return MeanSign(num_classes)


def public_layout_weights() -> dict:
    """The weights in the usual public layout: DataParallel prefixes under ``state_dict``."""
    m = MeanSign()
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1) / 3)
        m.conv.bias.zero_()
        k = torch.arange(10, dtype=torch.float32) - 4.5
        m.fc.weight.copy_(torch.stack([k, -k], dim=1))
        m.fc.bias.zero_()
    return {"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}, "best_prec1": 12.5, "epoch": 3}


class SizeLoop(MeanSign):
    """Loops over the batch size in Python: runs eagerly, but torch.fx cannot trace it."""

    def forward(self, x):
        for _ in range(x.shape[0]):
            pass
        return super().forward(x)


class ValueBranch(MeanSign):
    """Branches on a tensor value in Python: torch.fx refuses it with its own TraceError."""

    def forward(self, x):
        if x.mean() > 10:
            x = x / 10
        return super().forward(x)


def untraceable(num_classes: int = 10) -> nn.Module:
    return SizeLoop(num_classes)


def branching(num_classes: int = 10) -> nn.Module:
    return ValueBranch(num_classes)


def failing(num_classes: int = 10) -> nn.Module:
    raise RuntimeError("this factory needs a config file")


class WithBatchNorm(MeanSign):
    """MeanSign with a BatchNorm after the convolution (state saved by an older PyTorch lacks its
    ``num_batches_tracked``)."""

    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def with_batchnorm(num_classes: int = 10) -> nn.Module:
    return WithBatchNorm(num_classes)
