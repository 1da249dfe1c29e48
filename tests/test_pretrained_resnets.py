"""Published checkpoints load as torch loads them: the public pretrained CIFAR-10 ResNet-32/44
(BatchNorm saved without ``num_batches_tracked``, ``module.`` prefixes, a ``{"state_dict",
"best_prec1"}`` wrapper) through ``--model pretrained_resnets:NAME --weights FILE``."""
from __future__ import annotations

import json

import pytest
import torch

from sj_parallel_conversion import load_user_model
from sj_parallel_conversion.tools import cli, data

from pretrained_resnets import FILES, MEAN, STD


@pytest.mark.parametrize("name", sorted(FILES))
def test_pretrained_resnet_loads_strictly_and_classifies(pretrained_dir, name):
    file, _ = FILES[name]
    model = load_user_model(f"pretrained_resnets:{name}", str(pretrained_dir / file))
    assert not any(k.endswith("num_batches_tracked") for k in torch.load(pretrained_dir / file, weights_only=True,
                                                                          map_location="cpu")["state_dict"])
    x, y = data.cifar10_subset("test", limit=100, mean=MEAN, std=STD).tensors
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.85, acc  # 100 images: a wrong layout or normalisation gives ~10 %


@pytest.mark.slow  # the full CIFAR-10 test set through ResNet-32 and -44: minutes on 2 CPU cores
@pytest.mark.parametrize("name", sorted(FILES))
def test_pretrained_resnet_matches_the_published_accuracy(pretrained_dir, cifar10_dir, tmp_path, capsys, name):
    file, published = FILES[name]
    argv = ["evaluate", "--model", f"pretrained_resnets:{name}", "--weights", str(pretrained_dir / file),
            "--T", "32", "--data", "npz", "--data-root", str(cifar10_dir), "--mean", *map(str, MEAN),
            "--std", *map(str, STD), "--method", "ema", "--calib-images", "1000", "--batch-size", "250",
            "--no-progress", "--json", str(tmp_path / "t.json")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = {r["method"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    ann = rows["ann"]
    assert ann["images"] == 10000 and abs(100 * ann["accuracy"] - published) <= 0.5, ann
