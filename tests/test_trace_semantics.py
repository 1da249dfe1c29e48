"""What the traced graph must keep of the model's forward: in-place writes, and the arguments of
functional pools. Each converted network is compared with an independent one: the same model
written out of place (converted from the same data, so every calibrated value is the same), or
the ANN itself where QCFS at ``T == L`` is exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import ann2snn

from sj_parallel_conversion import QCFS, GraphConversionError, ParallelConversionRecipe, count_inference

T = 8


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _convert(model, data=None, T_=T):
    recipe = ParallelConversionRecipe(T=T_, dataloader=data, method="ema", progress=False)
    return ann2snn.Converter(recipe).convert(model.eval())


class TwoConvs(nn.Module):
    """conv -> (a ReLU written one of several ways) -> conv -> ReLU -> mean -> linear."""

    def __init__(self, style: str):
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu_inplace, self.relu = nn.ReLU(inplace=True), nn.ReLU()
        self.fc = nn.Linear(6, 4)
        self.style = style

    def forward(self, x):
        out = self.c1(x)
        if self.style == "module, unassigned":
            self.relu_inplace(out)             # out now holds relu(out)
        elif self.style == "relu_, unassigned":
            torch.relu_(out)
        elif self.style == "functional, input read again":
            h = F.relu(out, inplace=True)
            out = h + out                       # both are relu(c1(x))
        elif self.style == "out of place":
            out = self.relu(out)
        elif self.style == "out of place, doubled":
            out = 2 * self.relu(out)
        elif self.style == "module, unassigned, then a view":
            self.relu_inplace(out)
            flat = out.flatten(1)                # a view of the written tensor, taken after the write
            out = flat.view(flat.size(0), 6, 8, 8)
        elif self.style == "no first ReLU":
            pass
        out = self.relu(self.c2(out))
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize("style, twin", [
    ("module, unassigned", "out of place"),
    ("relu_, unassigned", "out of place"),
    ("functional, input read again", "out of place, doubled"),
    ("module, unassigned, then a view", "out of place"),
])
def test_an_in_place_activation_is_seen_by_later_reads(style, twin):
    data, x = _batches(), _batches(1, seed=5)[0]
    model, same, dropped = TwoConvs(style), TwoConvs(twin), TwoConvs("no first ReLU")
    with torch.no_grad():  # the twin computes the same function in eager mode
        assert torch.allclose(model(x.clone()), same(x.clone()), atol=1e-6)
    got = count_inference(_convert(model, data), x)
    assert torch.equal(got, count_inference(_convert(same, data), x))
    # Before the fix the in-place ReLU vanished from the graph: the network was this one.
    assert not torch.allclose(got, count_inference(_convert(dropped, data), x), atol=1e-3)


class WriteIntoSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.c1(x)
        torch.relu_(out[:, :3])                # writes into out through a slice
        return self.relu(self.c2(self.relu(out))).mean((2, 3))


def test_an_in_place_write_into_a_slice_read_later_is_refused():
    with pytest.raises(GraphConversionError) as info:
        _convert(WriteIntoSlice(), _batches())
    (problem,) = info.value.problems
    assert problem.kind == "in-place write into shared memory"
    assert problem.node == "relu_2"  # torch.relu_ (relu_ and relu_1 are the modules' names)
    assert "relu_ writes in place into a tensor that shares memory with 'c1'" in str(info.value)


class AliasThenAdd(nn.Module):
    """``z = y; y += h``: torch.fx records ``y = y + h``, so ``z`` would read the old ``y``."""

    def __init__(self, alias: bool):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.alias = alias

    def forward(self, x):
        h = self.relu(self.c1(x))
        y = self.c2(h)
        z = y if self.alias else y * 1       # a copy (.clone() does not convert)
        y += h
        return torch.cat([self.relu(y), self.relu(z)], 1).mean((2, 3))


class OutOfPlaceTwin(AliasThenAdd):
    def forward(self, x):
        h = self.relu(self.c1(x))
        y = self.c2(h)
        return torch.cat([self.relu(y + h), self.relu(y)], 1).mean((2, 3))


class FirstBatchOnly:
    """A loader that fails the test if conversion reads past its first batch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield self.batches[0]
        raise AssertionError("conversion read calibration data past the first batch")


def test_an_alias_of_a_tensor_written_in_place_is_refused_before_calibration():
    with pytest.raises(GraphConversionError, match=r"AliasThenAdd as traced by torch.fx does not compute"):
        _convert(AliasThenAdd(alias=True), FirstBatchOnly(_batches()))
    # Not a false alarm on ordinary += after a copy: it converts, to what the model computes.
    data, x = _batches(), _batches(1, seed=5)[0]
    model, twin = AliasThenAdd(alias=False), OutOfPlaceTwin(alias=False)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-6)
    assert torch.allclose(count_inference(_convert(model, data), x), count_inference(_convert(twin, data), x),
                          atol=1e-5)


class QCFSPools(nn.Module):
    def __init__(self, pool: str):
        super().__init__()
        torch.manual_seed(2)
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.q1 = QCFS(L=T, theta=2.0)
        self.pool = pool

    def forward(self, x):
        out = self.q1(self.c1(x))              # [N, 6, 7, 7] for 7 x 7 input
        if self.pool == "avg, ceil, padding not counted":
            out = F.avg_pool2d(out, 3, 2, 1, ceil_mode=True, count_include_pad=False)
        elif self.pool == "avg, divisor":
            out = F.avg_pool2d(out, 2, 2, 0, True, True, 3)
        elif self.pool == "max, dilated, ceil":
            out = F.max_pool2d(out, 2, 2, 0, 2, True)
        elif self.pool == "avg, size from the shape":
            out = F.avg_pool2d(out, out.size()[3])
        elif self.pool == "adaptive, size from the shape":
            out = F.adaptive_avg_pool2d(out, out.shape[2] // 2)
        return self.c2(out).flatten(1)         # linear after the pool: its errors are not rounded away


@pytest.mark.parametrize("pool", ["avg, ceil, padding not counted", "avg, divisor", "max, dilated, ceil"])
def test_functional_pools_keep_every_argument(pool):
    """QCFS at T == L is exact: the count domain must give the ANN's bits, shape included."""
    model, x = QCFSPools(pool).eval(), torch.randn(5, 3, 7, 7)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(count_inference(_convert(model), x), expected)


@pytest.mark.parametrize("pool", ["avg, size from the shape", "adaptive, size from the shape"])
@pytest.mark.parametrize("with_data", [False, True])
def test_a_pool_size_computed_from_a_shape_is_refused_naming_the_node(pool, with_data):
    model = QCFSPools(pool)
    with pytest.raises(GraphConversionError) as info:
        _convert(model, FirstBatchOnly(_batches()) if with_data else None, T_=T if not with_data else 4)
    (problem,) = info.value.problems
    assert problem.node in ("avg_pool2d", "adaptive_avg_pool2d")
    assert "sizes are numbers written in the model" in str(info.value)
    assert "F.adaptive_avg_pool2d(x, 1) or x.mean((2, 3))" in str(info.value)
