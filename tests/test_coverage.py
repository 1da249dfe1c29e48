"""The torchvision coverage list: which families convert (parallel conversion and SpikingJelly's
RateCodingRecipe), measured with benchmarks/coverage.py, and the table in docs/results agrees.

The small families run by default; the heavy ones are marked slow."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("sjpc_coverage_benchmark", ROOT / "benchmarks" / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_benchmark()

# family: (parallel conversion converts, RateCodingRecipe converts, what blocks parallel conversion)
EXPECTED = {
    "resnet18": (True, True, []),
    "vgg11_bn": (True, True, []),
    "alexnet": (True, True, []),
    "densenet121": (True, False, []),
    "mobilenet_v2": (True, False, []),
    "mobilenet_v3_small": (False, False, ["module Hardswish", "module Hardsigmoid", "product of tensors"]),
    "efficientnet_b0": (False, False, ["module SiLU", "module Sigmoid", "product of tensors"]),
    "regnet_x_400mf": (True, True, []),
    "squeezenet1_1": (True, True, []),
    "googlenet": (True, False, []),
    "shufflenet_v2_x0_5": (True, False, []),
    "mnasnet0_5": (True, False, []),
    "resnext50_32x4d": (True, True, []),
    "wide_resnet50_2": (True, True, []),
    "convnext_tiny": (False, False, ["function layer_norm", "module LayerNorm", "module GELU"]),
    "vit_b_16": (False, False, ["module LayerNorm", "module MultiheadAttention", "module GELU"]),
    "swin_t": (False, False, ["module LayerNorm", "function shifted_window_attention", "module GELU",
                              "function _patch_merging_pad"]),
    "inception_v3": (True, False, []),
}

# A few seconds together on one CPU thread; the rest take up to tens of seconds each.
FAST_PARALLEL = ["mnasnet0_5", "mobilenet_v3_small"]  # squeezenet, googlenet, shufflenet: test_graph_coverage.py
FAST_RATE = ["mobilenet_v3_small", "squeezenet1_1"]


def _param(families, fast):
    return [f if f in fast else pytest.param(f, marks=pytest.mark.slow) for f in families]


def test_expected_list_covers_every_family_of_the_benchmark():
    assert list(EXPECTED) == list(bench.FAMILIES)


@pytest.mark.parametrize("family", _param(EXPECTED, FAST_PARALLEL))
def test_parallel_conversion_coverage(family):
    converts, _, blockers = EXPECTED[family]
    why, kinds = bench.try_parallel(family)
    assert (why is None) == converts, why
    assert kinds == blockers


@pytest.mark.parametrize("family", _param(EXPECTED, FAST_RATE))
def test_rate_coding_recipe_coverage(family):
    _, converts, _ = EXPECTED[family]
    why = bench.try_rate_coding(family)
    assert (why is None) == converts, why


def test_docs_table_matches_the_expected_list():
    table = (ROOT / "docs" / "results" / "coverage.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in EXPECTED:
            rows[cells[0]] = (cells[1] == "yes", cells[3] == "yes", cells[2])
    assert set(rows) == set(EXPECTED)
    for family, (par, rate, blockers) in EXPECTED.items():
        assert rows[family][:2] == (par, rate), family
        for kind in blockers:
            assert kind in rows[family][2], (family, kind)
    assert f"converts {sum(v[0] for v in EXPECTED.values())} of {len(EXPECTED)}" in table
    assert f"RateCodingRecipe converts {sum(v[1] for v in EXPECTED.values())}." in table


def test_limits_page_links_the_table():
    text = (ROOT / "docs" / "limits.rst").read_text()
    assert "Will my model convert?" in text and "results/coverage.md" in text
