"""docs/limits.rst quotes the converter's refusals and says "The messages below are real ones".

Each test rebuilds the case a quoted message describes, triggers the error through the public API
the page shows (``ParallelConverter("parallel", T=4, ...).convert(model)``) and compares the error
text with the quote, read from the .rst file itself, so the page and the code cannot drift apart.
Quotes are compared after normalising whitespace (the page wraps them); a "..." in a quote stands
for elided text (never across a "; ").
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sj_parallel_conversion import (DAQCFS, QCFS, GraphConversionError, ParallelConversionNode,
                                    ParallelConverter)
from test_trace_semantics import AliasThenAdd, WriteIntoSlice  # the models the page quotes

DOC = Path(__file__).resolve().parents[1] / "docs" / "limits.rst"
TEXT = DOC.read_text(encoding="utf-8")


def _norm(s: str) -> str:
    return " ".join(s.split())


def _literal_blocks(text: str) -> List[str]:
    """The literal blocks of an .rst page (after a paragraph ending in ``::`` or a
    ``.. code-block:: text`` directive), each with its whitespace normalised."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not (line.rstrip().endswith("::") or re.match(r"\s*\.\. code-block::\s*text\s*$", line)):
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith(":")):
            j += 1  # blank lines and directive options
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        if body:
            blocks.append(_norm("\n".join(body)))
    return blocks


BLOCKS = _literal_blocks(TEXT)
# Inline quotes: ``...`` literals and "..." strings of running text, whitespace normalised.
INLINE = [_norm(m) for m in re.findall(r"``(.+?)``", TEXT, re.S) + re.findall(r'"([^"\n]+(?:\n[^"\n]+)?)"', TEXT)]


def _quote(fragment: str) -> str:
    """The one literal block of the page that contains ``fragment``."""
    found = [b for b in BLOCKS if fragment in b]
    assert len(found) == 1, f"docs/limits.rst: {len(found)} literal blocks contain {fragment!r}"
    return found[0]


def _inline(fragment: str) -> str:
    found = sorted({q for q in INLINE if fragment in q})
    assert len(found) == 1, f"docs/limits.rst: {len(found)} inline quotes contain {fragment!r}: {found}"
    return found[0]


def _messages(block: str) -> List[str]:
    """A block that quotes several problems: one message per 'graph node ...'."""
    return [m.strip() for m in re.split(r"(?=graph node ')", block) if m.strip()]


def _assert_quoted(quote: str, actual: str) -> None:
    """``actual`` reads as ``quote``, where a "..." in the quote stands for elided text."""
    pattern = r"[^;]+?".join(re.escape(part) for part in quote.split("..."))
    assert re.fullmatch(pattern, _norm(actual)), (
        f"docs/limits.rst quotes\n  {quote}\nbut the code prints\n  {_norm(actual)}")


class NoData:
    """Fails the test if anything reads it: graph refusals come before calibration."""

    def __iter__(self):
        raise AssertionError("the converter read calibration data before refusing the model")


def _refuse(model: nn.Module, loader=None, error=GraphConversionError) -> Exception:
    with pytest.raises(error) as info:
        ParallelConverter("parallel", T=4, dataloader=NoData() if loader is None else loader,
                          progress=False).convert(model.eval())
    return info.value


# -- the models the page describes -------------------------------------------------------------
class Head(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Block(Head):
    pass


class Net(nn.Module):
    """conv -> ReLU -> whatever ``tail`` names (modules set as attributes, then called in order)."""

    def __init__(self, **tail):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.r = nn.ReLU()
        self.order = list(tail)
        for name, m in tail.items():
            setattr(self, name, m)

    def forward(self, x):
        h = self.r(self.c(x))
        for name in self.order:
            h = getattr(self, name)(h)
        return h


class PoolOfCurrents(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.r, self.c2, self.pool = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.c2(self.r(self.c(x))))


class Product(Net):
    def forward(self, x):
        h = super().forward(x)
        return h * h


class DivideByTensor(Net):
    def forward(self, x):
        return 2.0 / super().forward(x)


class ReflectPad(Net):
    def forward(self, x):
        return F.pad(super().forward(x), (1, 1, 1, 1), mode="reflect")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.q, self.l2, self.a2 = nn.Linear(4, 4), QCFS(4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.a2(self.l2(self.q(self.l1(x))))


def _assert_single(err: GraphConversionError, quote: str) -> None:
    """One problem: it reads as the quote, and the error is that problem prefixed 'cannot convert:'."""
    assert isinstance(err, ValueError)
    assert [p.message for p in err.problems] == [err.problems[0].message]
    _assert_quoted(quote, err.problems[0].message)
    assert str(err) == f"cannot convert: {err.problems[0].message}"


# -- the quoted blocks -------------------------------------------------------------------------
def test_max_pooling_of_currents():
    _assert_single(_refuse(PoolOfCurrents()), _quote("max pooling of analog currents"))


def test_product_of_tensors():
    _assert_single(_refuse(Product()), _quote("the product of two tensors"))


def test_mean_over_the_batch_axis():
    _assert_single(_refuse(Net(head=Head(lambda h: h.mean(0)))), _quote("mean over the batch axis"))


def test_reshape_that_moves_the_batch_axis_found_on_data():
    # [N, 4, 6, 6] per-sample tensors viewed as (-1, 36): the static check takes the -1 on trust,
    # the run on three images of the first batch finds (12, 36).
    loader = [(torch.randn(5, 3, 8, 8), torch.zeros(5, dtype=torch.long))]
    err = _refuse(Net(head=Head(lambda h: h.view(-1, 36))), loader=loader)
    _assert_single(err, _quote("turns a batch of 3 into shape"))


def test_non_linear_functions_methods_and_modules():
    block = _quote("function sigmoid is not")
    quotes = _messages(block)
    assert len(quotes) == 3, block
    err = _refuse(Net(b1=Block(lambda h: torch.sigmoid(h).softmax(1)), gelu=nn.GELU()))
    assert len(err.problems) == len(quotes)
    for quote, problem in zip(quotes, err.problems):
        _assert_quoted(quote, problem.message)
    # Several problems: a summary line, then one line per problem.
    assert str(err).splitlines()[1:] == [f"  {p.message}" for p in err.problems]


def test_normalisation_by_own_statistics():
    _assert_single(_refuse(Net(norm=nn.GroupNorm(2, 4))), _quote("(GroupNorm)"))


def test_mixed_qcfs_and_relu():
    err = _refuse(Mixed(), error=ValueError)
    _assert_quoted(_quote("the model mixes QCFS sites"), str(err))


def test_vision_transformer_summary():
    torchvision = pytest.importorskip("torchvision")
    # The summary depends on the module tree only (the check reads no weight), so the model is built
    # on the meta device: vit_b_16's random initialisation alone takes seconds.
    with torch.device("meta"):
        vit = torchvision.models.vit_b_16(weights=None)
    err = _refuse(vit)
    _assert_quoted(_quote("unsupported operations of 3 kinds"), str(err).splitlines()[0])


def test_in_place_write_into_shared_memory():
    err = _refuse(WriteIntoSlice())
    assert err.problems[0].kind == "in-place write into shared memory"
    _assert_single(err, _quote("writes in place into a tensor that shares memory"))


def test_trace_that_differs_from_the_model():
    loader = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))]
    err = _refuse(AliasThenAdd(alias=True), loader=loader)
    quote = _quote("does not compute what AliasThenAdd.forward computes")
    # The size of the difference depends on the weights: compared as elided text.
    _assert_quoted(re.sub(r"differ by [0-9.]+ of", "differ by ... of", quote), str(err))


def test_pool_size_from_a_shape():
    class AkamasterHead(Net):
        def forward(self, x):
            h = super().forward(x)
            return F.avg_pool2d(h, h.size()[3])
    err = _refuse(AkamasterHead())
    assert len(err.problems) == 1 and err.problems[0].node == "avg_pool2d"
    assert "F.avg_pool2d(out, out.size()[3])" in _inline("F.avg_pool2d(out, out.size()[3])")
    assert _norm(str(err)).endswith(
        "only a pool whose sizes are numbers written in the model becomes a module; a size computed from a "
        "shape (F.avg_pool2d(x, x.size(3))) can be written as its number, or a global pool as "
        "F.adaptive_avg_pool2d(x, 1) or x.mean((2, 3))")


# -- messages the page quotes inline -----------------------------------------------------------
def test_division_by_a_tensor():
    err = _refuse(DivideByTensor())
    assert len(err.problems) == 1
    assert err.problems[0].message.endswith(": " + _inline("by a tensor or with rounding is not linear"))


def test_reflect_padding():
    err = _refuse(ReflectPad())
    assert len(err.problems) == 1
    assert err.problems[0].message.endswith(": " + _inline("only constant padding with a literal pad"))


def test_inference_only():
    x = torch.randn(4, 2, 3, requires_grad=True)
    y = ParallelConversionNode(4, backend="torch")(x)  # no native kernel to build
    with pytest.raises(RuntimeError) as info:
        y.sum().backward()
    assert _inline("inference-only operator") in _norm(str(info.value))


def test_non_positive_spike_value_after_calibration():
    # What a calibration that drives theta + phi_da to zero or below leaves behind.
    da = DAQCFS(T=4, theta=1.0, phi_da=-1.0)
    with pytest.raises(ValueError) as info:
        da.to_node()
    assert _inline("smaller alpha") in _norm(str(info.value))


def test_every_quoted_refusal_is_covered():
    # A new refusal quoted on the page needs a case here: the blocks this file compares, and the
    # page's other literal blocks (code, not messages), are all the page has.
    compared = ["max pooling of analog currents", "the product of two tensors", "mean over the batch axis",
                "turns a batch of 3 into shape", "function sigmoid is not", "(GroupNorm)",
                "the model mixes QCFS sites", "unsupported operations of 3 kinds",
                "writes in place into a tensor that shares memory", "does not compute what AliasThenAdd"]
    quotes = {_quote(f) for f in compared}
    others = [b for b in BLOCKS if b not in quotes]
    assert all(b.startswith("from sj_parallel_conversion import") for b in others), others
