"""Graph coverage of the converter: concatenated spiking branches under max pooling, shape
arithmetic, channel chunks, constant scaling, batch-axis refusals, and one error listing every
unsupported operation, found before any calibration data is read."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from spikingjelly.activation_based import ann2snn

from sj_parallel_conversion import (
    QCFS,
    GraphConversionError,
    ParallelConversionRecipe,
    ParallelConverter,
    count_inference,
    spike_inference,
)
from sj_parallel_conversion.graph import ChunkPart, ConstantScale, GraphProblem


class ExplodingLoader:
    """Fails the test if anything iterates over it (graph errors must come before calibration)."""

    def __iter__(self):
        raise AssertionError("the converter read calibration data before rejecting the model")


def _convert(model, T=4, data=None):
    loader = ExplodingLoader() if data is None else [data]
    return ParallelConverter("parallel", T=T, dataloader=loader, method="ema", progress=False).convert(model)


# -- torchvision families that need the new patterns ----------------------------------------------
def _family(name):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, **kw).eval().double()


@pytest.mark.parametrize("name", ["squeezenet1_1", pytest.param("googlenet", marks=pytest.mark.slow),
                                  "shufflenet_v2_x0_5"])
def test_torchvision_family_converts_and_spikes_equal_count_domain_in_float64(name):
    ann = _family(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    snn = _convert(ann, T=4, data=x)
    spikes = spike_inference(snn, x)
    counts = count_inference(snn, x)
    assert spikes.shape == (4, 2, 1000)
    # Random weights still spike: the outputs are not all equal (a dead network would pass trivially).
    assert counts.std() > 0
    torch.testing.assert_close(spikes.mean(0), counts, rtol=1e-12, atol=1e-12)
    modules = dict(snn.named_modules())
    if name == "shufflenet_v2_x0_5":
        assert any(isinstance(m, ChunkPart) for m in modules.values())
    else:
        # At least one max pool reads a concatenation of spiking branches (Fire / Inception).
        def reads_cat(node):
            src = node.args[0]
            return (src.op == "call_function" and src.target is torch.cat) or (
                src.op == "call_module" and getattr(modules[src.target], "op_name", None) == "cat")

        assert any(n.op == "call_module" and isinstance(modules[n.target], nn.MaxPool2d) and reads_cat(n)
                   for n in snn.graph.nodes)


class CatPool(nn.Module):
    """Two ReLU branches concatenated along ``dim``, then max pooled."""

    def __init__(self, dim):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.ra, self.rb = nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.dim = dim

    def forward(self, x):
        return self.pool(torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], self.dim)).flatten(1)


def test_max_pool_after_channel_concatenation_is_exact_but_not_after_spatial_one():
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    snn = _convert(CatPool(1).double(), T=4, data=x)
    torch.testing.assert_close(spike_inference(snn, x).mean(0), count_inference(snn, x), rtol=1e-12, atol=1e-12)
    # Along a spatial axis a pool window mixes trains of different spike values: refused.
    with pytest.raises(GraphConversionError, match=r"graph node 'pool'.*max pooling of analog currents"):
        _convert(CatPool(2))


# -- constant scaling -----------------------------------------------------------------------------
class Scaled(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.c1, self.q1 = nn.Conv2d(3, 6, 3, padding=1), QCFS(4, theta=1.0)
        self.c2, self.q2 = nn.Conv2d(6, 6, 3, padding=1), QCFS(4, theta=1.0)
        self.fc = nn.Linear(6, 3)
        self.register_buffer("gain", torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1))
        self.op = op

    def forward(self, x):
        h = self.q1(self.c1(x))
        h = self.op(self, h)
        h = self.q2(self.c2(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("op", [
    lambda m, h: h * 2.0,
    lambda m, h: 0.5 * h,
    lambda m, h: h / 3.0,
    lambda m, h: torch.div(h, 7),
    lambda m, h: h * m.gain,
    lambda m, h: h / m.gain,
    lambda m, h: h.mul(1.5) / h.size(1),
], ids=["mul", "rmul", "div", "torch.div", "mul-buffer", "div-buffer", "method-and-shape"])
def test_scaling_by_a_constant_is_exact(op):
    torch.manual_seed(0)
    ann = Scaled(op).eval().double()
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    snn = ann2snn.Converter(ParallelConversionRecipe(4, progress=False)).convert(ann)  # QCFS at T == L: lossless
    assert any(isinstance(m, ConstantScale) for m in snn.modules())
    with torch.no_grad():
        ref = ann(x)
    torch.testing.assert_close(spike_inference(snn, x).mean(0), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(count_inference(snn, x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op, pattern", [
    (lambda h: 2.0 / h, r"graph node 'truediv'.*not linear"),
    (lambda h: h // 2, r"graph node 'floordiv'.*not linear"),
    (lambda h: torch.div(h, 2, rounding_mode="floor"), r"graph node 'div'.*not linear"),
    (lambda h: h * h, r"graph node 'mul'.*product of two tensors"),
])
def test_non_linear_scaling_refused(op, pattern):
    with pytest.raises(GraphConversionError, match=pattern):
        _convert(Headed(op))


# -- batch axis ------------------------------------------------------------------------------------
class Head(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, h):
        return self.op(h)


class Headed(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.c, self.r = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.head = Head(op)

    def forward(self, x):
        return self.head(self.r(self.c(x)))


@pytest.mark.parametrize("op, node", [
    (lambda h: h.mean(0), "mean"),
    (lambda h: h.mean(), "mean"),
    (lambda h: h.transpose(0, 1), "transpose"),
    (lambda h: torch.transpose(h, 1, 0), "transpose"),
    (lambda h: h.permute(1, 0, 2, 3), "permute"),
    (lambda h: h[0], "getitem"),
    (lambda h: h[1:], "getitem"),
    (lambda h: h.view(-1), "view"),
    (lambda h: h.reshape(2, -1), "reshape"),
    (lambda h: h.reshape(h.size(0) * 2, -1), "reshape"),
    (lambda h: torch.flatten(h), "flatten"),
    (lambda h: torch.cat([h, h], 0), "cat"),
    (lambda h: h.unsqueeze(0), "unsqueeze"),
    (lambda h: h.chunk(2, 0)[0], "chunk"),
])
def test_batch_axis_operations_refused_at_conversion_naming_node_and_module(op, node):
    with pytest.raises(GraphConversionError) as info:
        _convert(Headed(op))
    err = info.value
    assert len(err.problems) == 1
    (p,) = err.problems
    assert p.kind == "batch axis" and p.module == "head"
    assert f"graph node '{node}" in str(err) and "in module head (Head)" in str(err) and "batch axis" in str(err)


@pytest.mark.parametrize("op, node", [
    (lambda h: h.view(-1, 36), "view"),             # [N, 4, 6, 6] -> [4N, 36]: a leading -1 that is not N
    (lambda h: h.transpose(-4, -3), "transpose"),   # a negative axis that is the batch axis
    (lambda h: h.mean(-4), "mean"),
])
def test_batch_axis_operations_the_static_check_cannot_see_are_refused_before_calibration(op, node):
    x = torch.randn(4, 3, 8, 8)

    class FirstBatchOnly:
        """The model checks read the first batch; calibration would read the second."""

        def __iter__(self):
            yield x
            raise AssertionError("calibration started on a model with a batch-axis operation")

    with pytest.raises(GraphConversionError, match=rf"graph node '{node}'.*in module head \(Head\).*batch axis"):
        ParallelConverter("parallel", T=4, dataloader=FirstBatchOnly(), method="ema", progress=False).convert(
            Headed(op).eval())


@pytest.mark.parametrize("op", [
    lambda h: h.view(h.size(0), -1),
    lambda h: h.reshape(h.shape[0], 2, -1),
    lambda h: h.view(-1, 4 * 6 * 6),
    lambda h: h.mean([2, 3]),
    lambda h: h.transpose(2, 3).flatten(1),
    lambda h: h[:, 1:3],
    lambda h: torch.cat([h, h], dim=1).flatten(1),
])
def test_per_sample_reshapes_convert_and_match_count_domain(op):
    torch.manual_seed(0)
    ann = Headed(op).eval().double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    snn = _convert(ann, data=x)
    torch.testing.assert_close(spike_inference(snn, x).mean(0), count_inference(snn, x), rtol=1e-12, atol=1e-12)


# -- one error for every problem -------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.act = nn.GELU()

    def forward(self, h):
        return torch.sigmoid(self.act(self.norm(h))).softmax(-1)


class ManyProblems(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r = nn.Linear(4, 4), nn.ReLU()
        self.b1, self.b2 = Block(), Block()

    def forward(self, x):
        h = self.r(self.c(x))
        return self.b2(self.b1(h)) * h


def test_every_unsupported_operation_listed_in_one_error_before_calibration():
    with pytest.raises(GraphConversionError) as info:
        _convert(ManyProblems().eval())
    err = info.value
    assert all(isinstance(p, GraphProblem) for p in err.problems)
    found = {(p.kind, p.module) for p in err.problems}
    per_block = lambda b: {("module LayerNorm", f"{b}.norm"), ("module GELU", f"{b}.act"),  # noqa: E731
                           ("function sigmoid", b), ("method .softmax()", b)}
    assert found == per_block("b1") | per_block("b2") | {("product of tensors", "")}
    lines = str(err).splitlines()
    # First line: one summary naming every kind; then one line per problem.
    assert lines[0].startswith("cannot convert: 9 unsupported operations of 5 kinds")
    for kind in ("module LayerNorm x2", "module GELU x2", "function sigmoid x2", "method .softmax() x2",
                 "product of tensors x1"):
        assert kind in lines[0]
    assert len(lines) == 1 + len(err.problems)
    assert "in module b2.norm (LayerNorm)" in str(err)


def test_vision_transformer_blockers_are_layernorm_attention_and_gelu():
    # torchvision's ViT at a small size: the same code and modules as vit_b_16 (tests/test_coverage.py
    # has the full-size one, marked slow).
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                               hidden_dim=8, mlp_dim=16).eval()
    with pytest.raises(GraphConversionError) as info:
        _convert(vit)
    kinds = {p.kind for p in info.value.problems}
    assert kinds == {"module LayerNorm", "module MultiheadAttention", "module GELU"}
    # ViT's shape asserts (`h == self.image_size`) are shape arithmetic, not problems.
    assert not any("eq" in p.node for p in info.value.problems)
    assert "encoder.layers.encoder_layer_1.self_attention" in {p.module for p in info.value.problems}
