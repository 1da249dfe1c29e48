"""The "Your own models" promises of docs/files.rst run end to end through the command line:
``convert --model torchvision:resnet18 --num-classes 10 --weights r18.pth`` then
``evaluate --snn FILE --mode spike``; ``--model``/``--weights`` in ``stats`` and ``search-t`` as
wherever ``--checkpoint`` works; and a state_dict wrapped under ``state_dict``/``model``/
``model_state_dict`` with ``module.``/``_orig_mod.`` prefixes scoring as the plain file does."""
from __future__ import annotations

import json

import pytest
import torch

from sj_parallel_conversion import load_snn
from sj_parallel_conversion.neuron import ParallelConversionNode
from sj_parallel_conversion.tools import data

from cli_run import run_cli_line
from cli_user_models import factory, public_layout_weights

USER = "cli_user_models:factory"
SMALL = ["--data", "subset", "--batch-size", "8", "--calib-images", "16", "--no-progress"]


def _plain_weights() -> dict:
    """public_layout_weights() unwrapped: the state_dict itself, without ``module.`` prefixes."""
    return {k[len("module."):]: v for k, v in public_layout_weights()["state_dict"].items()}


def test_torchvision_resnet18_convert_then_evaluate_the_file_at_spike_level(tmp_path, capsys):
    """The docs' sequence: convert a torchvision ResNet-18 from a plain state_dict, then evaluate
    the written file at spike level."""
    import torchvision

    with torch.random.fork_rng():  # random weights, without moving the other tests' random state
        torch.manual_seed(0)
        ann = torchvision.models.resnet18(weights=None, num_classes=10)
    weights, snn_file = tmp_path / "r18.pth", tmp_path / "r18_T2.pt"
    torch.save(ann.state_dict(), weights)
    code, out, line = run_cli_line(["convert", "--model", "torchvision:resnet18", "--num-classes", "10",
                                    "--weights", weights, "--T", "2", "--out", snn_file, "--method", "ema", *SMALL],
                                   capsys)
    assert code == 0 and f"wrote {snn_file}" in out, (line, out)
    assert snn_file.is_file()
    snn = load_snn(snn_file)
    assert snn.snn_metadata["T"] == 2
    assert snn.snn_metadata["model"]["name"] == "torchvision:resnet18"
    assert snn.snn_metadata["model"]["num_classes"] == 10
    # The file holds the saved weights (the classifier is not folded with a BatchNorm), not a fresh model's.
    assert torch.equal(snn.state_dict()["fc.weight"], ann.fc.weight.detach())
    # A ReLU module that BasicBlock calls twice becomes one neuron per call: the stem's, then two per block.
    assert sum(isinstance(m, ParallelConversionNode) for m in snn.modules()) == 1 + 2 * 8

    table = tmp_path / "eval.json"
    code, out, line = run_cli_line(["evaluate", "--snn", snn_file, "--mode", "spike", "--data", "subset",
                                    "--limit", "8", "--batch-size", "8", "--json", table, "--no-progress"], capsys)
    assert code == 0 and "spike-level" in out, (line, out)
    (row,) = json.loads(table.read_text())["rows"]
    assert row["method"] == "parallel" and row["T"] == 2 and row["images"] == 8 and row["status"] == "ok", row
    assert row["calibration"] == "ema", row


@pytest.fixture(scope="module")
def user_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "w.pth"
    torch.save(public_layout_weights(), path)
    return path


def test_stats_with_model_and_weights(user_weights, tmp_path, capsys):
    report = tmp_path / "stats.json"
    code, out, line = run_cli_line(["stats", "--model", USER, "--weights", user_weights, "--T", "4", "--method", "ema",
                                    "--images", "8", "--json", report, *SMALL], capsys)
    assert code == 0 and f"{USER} at T=4, 8 test images" in out, (line, out)
    doc = json.loads(report.read_text())
    assert doc["images"] == 8
    (neuron,) = [layer for layer in doc["layers"] if layer["kind"] == "neuron"]  # MeanSign's one ReLU
    assert neuron["firing_rate"] > 0, neuron
    # The statistics are those of the given weights: a convolution that never drives the ReLU fires nothing.
    dead = factory().state_dict()
    dead["conv.weight"].zero_()
    dead["conv.bias"].fill_(-1.0)
    torch.save(dead, tmp_path / "dead.pth")
    code, _, line = run_cli_line(["stats", "--model", USER, "--weights", tmp_path / "dead.pth", "--T", "4",
                                  "--method", "ema", "--images", "8", "--json", report, *SMALL], capsys)
    assert code == 0, line
    (neuron,) = [layer for layer in json.loads(report.read_text())["layers"] if layer["kind"] == "neuron"]
    assert neuron["firing_rate"] == 0, neuron


def test_search_t_with_model_and_weights(user_weights, tmp_path, capsys):
    result = tmp_path / "layer_T.json"
    code, out, line = run_cli_line(["search-t", "--model", USER, "--weights", user_weights, "--T-max", "4",
                                    "--candidates", "1", "2", "--search-batches", "1", "--json", result, *SMALL],
                                   capsys)
    assert code == 0 and f"wrote {result}" in out, (line, out)
    doc = json.loads(result.read_text())
    assert doc["uniform_T"] == 4
    assert isinstance(doc["T"], dict) and len(doc["T"]) == 1, doc["T"]  # per-layer T of MeanSign's one neuron
    assert all(t in (1, 2, 4) for t in doc["T"].values()), doc["T"]
    # What search-t writes is what convert takes as --T FILE.
    code, out, line = run_cli_line(["convert", "--model", USER, "--weights", user_weights, "--T", result,
                                    "--out", tmp_path / "snn.pt", "--method", "ema", *SMALL], capsys)
    assert code == 0 and (tmp_path / "snn.pt").is_file(), line


def _rows(path) -> list:
    """The table's rows without their timings."""
    timing = {"convert_s", "eval_s", "images_per_s"}
    return [{k: v for k, v in row.items() if k not in timing} for row in json.loads(path.read_text())["rows"]]


@pytest.mark.parametrize("key,prefix", [("state_dict", "module."), ("model", "_orig_mod."),
                                        ("model_state_dict", "module.")])
def test_wrapped_state_dict_scores_as_the_plain_file(tmp_path, capsys, key, prefix):
    plain = _plain_weights()
    torch.save(plain, tmp_path / "plain.pth")
    torch.save({key: {prefix + k: v for k, v in plain.items()}, "best_prec1": 12.5, "epoch": 3},
               tmp_path / "wrapped.th")
    limit = 64
    common = ["evaluate", "--model", USER, "--T", "4", "--method", "ema", "--limit", str(limit), *SMALL]
    for name in ("plain", "wrapped"):
        code, _, line = run_cli_line([*common, "--weights", tmp_path / f"{name}.{'pth' if name == 'plain' else 'th'}",
                                      "--json", tmp_path / f"{name}.json"], capsys)
        assert code == 0, (name, line)
    rows = _rows(tmp_path / "plain.json")
    assert _rows(tmp_path / "wrapped.json") == rows
    # Both loaded the given weights: the ANN row scores what MeanSign with them scores in-process.
    model = factory().eval()
    model.load_state_dict(plain)
    x, y = data.cifar10_subset("test").tensors
    with torch.no_grad():
        expected = (model(x[:limit]).argmax(1) == y[:limit]).float().mean().item()
    ann = next(r for r in rows if r["method"] == "ann")
    assert ann["images"] == limit and ann["accuracy"] == pytest.approx(expected), (ann, expected)
    assert 0 < expected < 1  # the weights decide the score: not all or nothing
