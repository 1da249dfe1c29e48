"""Issue 26, the command line a user meets: bounded and documented defaults, ignored options
refused, search-t's JSON accepted by --T, errors that point at the fix."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from sj_parallel_conversion import ParallelConversionNode, load_snn
from sj_parallel_conversion.tools import cli, models

from cli_run import run_cli, run_cli_line

ROOT = Path(__file__).resolve().parents[1]


def _subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _valued_options(sub):
    """Options that take a value (flags, --help and the required choice of source excluded)."""
    required = {a for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
    return [a for a in sub._actions if a.option_strings and a.nargs != 0 and a not in required
            and not isinstance(a, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreConstAction))]


# -- item 4: bounded, documented defaults ---------------------------------------------------------
def test_every_option_that_takes_a_value_states_its_default_in_help():
    missing = [f"{name} {a.option_strings[0]}" for name, sub in _subcommands().items() for a in _valued_options(sub)
               if not re.search(r"\b(default|required)\b", a.help or "")]
    assert not missing, f"--help does not state the default of {missing}"


def test_calibration_reads_a_bounded_number_of_images_by_default():
    parser = cli.build_parser()
    convert = _subcommands()["convert"]
    help_text = " ".join(convert.format_help().split())
    assert "--calib-images N" in help_text and "(default 1024)" in help_text
    args = parser.parse_args(["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--data", "digits"])
    cli._check_args(args)
    assert args.calib_images == cli.CALIB_IMAGES == 1024
    calib, _ = cli._loaders(args, need_train=True)
    assert len(calib.dataset) == 1024 < len(calib.dataset.dataset)  # digits has 1,347 training images
    args = parser.parse_args(["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--data", "digits",
                              "--calib-images", "100", "--batch-size", "32"])
    cli._check_args(args)
    calib, _ = cli._loaders(args, need_train=True)
    assert sum(len(x) for x, _ in calib) == 100


def test_every_option_is_in_the_command_line_reference():
    """docs/cli.rst names every option of every subcommand in that subcommand's section."""
    text = (ROOT / "docs" / "cli.rst").read_text()
    missing = []
    for name, sub in _subcommands().items():
        match = re.search(rf"^``sj-parallel {re.escape(name)}``\n[-~^=]+\n(.*?)(?=^``sj-parallel |\Z)", text,
                          re.S | re.M)
        assert match, f"docs/cli.rst has no section for {name}"
        section = match.group(1)
        missing += [f"{name} {a.option_strings[-1]}" for a in sub._actions
                    if a.option_strings and not isinstance(a, argparse._HelpAction)
                    and f"``{a.option_strings[-1]}" not in section]
    assert not missing, f"docs/cli.rst does not document {missing}"


@pytest.mark.parametrize("argv, pattern", [
    (["evaluate", "--snn", "f.pt", "--method", "learned"], "--method does not apply to --snn"),
    (["stats", "--snn", "f.pt", "--calib-images", "3"], "--calib-images does not apply to --snn"),
    (["evaluate", "--snn", "f.pt", "--T", "layer_T.json"], "--T FILE does not apply to --snn"),
    (["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--calibrate", "no", "--method", "ema"],
     "--method does not apply with --calibrate no"),
    (["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--calibrate", "no", "--alpha", "0.9"],
     "--alpha does not apply with --calibrate no"),
    (["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--method", "paper", "--alpha", "0.9"],
     "--alpha does not apply with --method paper"),
    (["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--method", "moment", "--alpha", "0.9"],
     "--alpha does not apply with --method moment"),
    (["convert", "--checkpoint", "c.pt", "--T", "4", "--out", "o.pt", "--alpha", "1.5"], "--alpha must lie in [0, 1)"),
    (["compare", "--checkpoint", "c.pt", "--methods", "ann", "ltb", "--method", "ema"], "--method does not apply"),
    (["compare", "--checkpoint", "c.pt", "--methods", "ann", "--calib-images", "64"], "--calib-images does not apply"),
    (["evaluate", "--checkpoint", "c.pt", "--T", "4", "--data", "subset", "--data-root", "x"],
     "--data-root does not apply to --data subset"),
    (["evaluate", "--checkpoint", "c.pt", "--T", "4", "--data", "npz", "--download"],
     "--download applies to --data cifar10 / cifar100 only"),
    (["search-t", "--checkpoint", "c.pt", "--T-max", "8", "--candidates", "2", "8", "16"],
     "--candidates 8 16: not below --T-max 8"),
])
def test_options_that_would_be_ignored_are_refused_in_one_line(argv, pattern, capsys):
    code, out, line = run_cli_line(argv, capsys)
    assert code == 2 and line.startswith("sj-parallel: error: ") and pattern in line, line
    assert not out


def test_stats_has_one_option_for_its_image_count(capsys):
    """stats runs --images test images; --limit, which it used to take and ignore, is not an option."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["stats", "--checkpoint", "c.pt", "--T", "4", "--images", "64", "--limit", "32"])
    assert exc.value.code == 2 and "unrecognized arguments: --limit 32" in capsys.readouterr().err


# -- item 5: search-t's JSON is a --T FILE ---------------------------------------------------------
@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    models.save_checkpoint(str(path), models.build_model("digits_cnn", in_channels=1), name="digits_cnn", act="relu",
                           L=8, num_classes=10, in_channels=1)
    return path


@pytest.mark.parametrize("method, kind", [("distill", "DistillCalibration"), ("learned", "LearnedCalibration")])
def test_learn_steps_sets_the_length_of_the_fit(digits_checkpoint, tmp_path, monkeypatch, capsys, method, kind):
    """cli.rst: --learn-steps N is distill's steps per block and learned's most steps."""
    from sj_parallel_conversion import recipe

    seen = []
    real = recipe.learn_calibration

    def spy(*args, **kwargs):
        options = args[6]
        seen.append((type(options).__name__, options.steps))
        fitted, history = real(*args, **kwargs)
        seen.append(history["steps_run"])
        return fitted, history

    monkeypatch.setattr(recipe, "learn_calibration", spy)
    code, _, err = run_cli(["convert", "--checkpoint", digits_checkpoint, "--T", "2", "--method", method,
                            "--learn-steps", "7", "--calib-images", "64", "--data", "digits", "--batch-size", "64",
                            "--no-progress", "--out", tmp_path / "s.pt"], capsys)
    assert code == 0, err
    (used, steps_run) = seen
    assert used == (kind, 7)
    assert steps_run <= 7 if method == "learned" else steps_run % 7 == 0 and steps_run > 0


def test_search_t_json_round_trips_through_convert_evaluate_and_stats(digits_checkpoint, tmp_path, capsys):
    data = ["--data", "digits", "--batch-size", "64", "--no-progress"]
    layer_T = tmp_path / "layer_T.json"
    code, _, line = run_cli_line(["search-t", "--checkpoint", digits_checkpoint, "--T-max", "4", "--candidates", "2",
                          "--search-batches", "1", "--calib-images", "64", "--max-loss", "0.99", "--json", layer_T,
                          *data], capsys)
    assert code == 0, line
    searched = json.loads(layer_T.read_text())["T"]
    assert set(searched.values()) == {2}  # a loss budget of 99 points: every layer takes the candidate

    out = tmp_path / "snn.pt"
    code, printed, line = run_cli_line(["convert", "--checkpoint", digits_checkpoint, "--T", layer_T, "--out", out,
                                "--method", "ema", "--calib-images", "64", *data], capsys)
    assert code == 0, line
    assert f"per-layer T from {layer_T}" in printed
    snn = load_snn(out)
    assert {n: m.T for n, m in snn.named_modules() if isinstance(m, ParallelConversionNode)} == searched
    assert snn.snn_metadata["layer_T"] == searched and snn.snn_metadata["T"] == 2

    table = tmp_path / "ev.json"
    code, printed, line = run_cli_line(["evaluate", "--checkpoint", digits_checkpoint, "--T", "4", layer_T, "--method", "ema",
                                "--calib-images", "64", "--limit", "64", "--json", table, *data], capsys)
    assert code == 0, line
    assert "per-layer T from" in printed
    # The per-layer network is a series of its own (at its largest T), not a point of uniform T's.
    rows = json.loads(table.read_text())["rows"]
    assert [(r["method"], r["T"]) for r in rows] == [("ann", None), ("parallel-count", 4),
                                                     ("parallel-count-layer-T", 2)]
    code, printed, line = run_cli_line(["evaluate", "--snn", out, "--limit", "64", *data], capsys)
    assert code == 0 and "per-layer T (2..2" in printed, line
    code, printed, line = run_cli_line(["stats", "--checkpoint", digits_checkpoint, "--T", layer_T, "--method", "ema",
                                "--calib-images", "64", "--images", "8", *data], capsys)
    assert code == 0 and f"at per-layer T from {layer_T}" in printed, line


@pytest.mark.parametrize("content, pattern", [
    ("not json", "not a JSON file"),
    ('{"T": {"conv": 0}}', "every layer's T must be a positive integer"),
    ('{"T": {}}', "expected a JSON object of per-layer T"),
    ("[4, 8]", "expected a JSON object of per-layer T"),
])
def test_bad_T_files_are_refused_in_one_line(content, pattern, tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(content)
    code, _, line = run_cli_line(["convert", "--checkpoint", tmp_path / "missing.pt", "--T", path, "--out", tmp_path / "o.pt"],
                         capsys)
    assert code == 2 and f"--T {path}" in line and pattern in line, line
    code, _, line = run_cli_line(["convert", "--checkpoint", "c.pt", "--T", tmp_path / "none.json", "--out", "o.pt"], capsys)
    assert code == 2 and "no such file" in line


# -- item 7: errors that point at the fix ----------------------------------------------------------
def test_a_plain_state_dict_given_as_checkpoint_points_at_model_and_weights(tmp_path, capsys):
    path = tmp_path / "small_cnn.pth"
    torch.save(models.build_model("digits_cnn", in_channels=1).state_dict(), path)
    code, _, line = run_cli_line(["evaluate", "--checkpoint", path, "--T", "4", "--data", "digits"], capsys)
    assert code == 2 and "plain state_dict" in line and f"--model NAME --weights {path}" in line, line


def test_a_torchvision_head_of_another_size_points_at_num_classes(tmp_path, capsys):
    import torchvision

    path = tmp_path / "r18_10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    code, _, line = run_cli_line(["evaluate", "--model", "torchvision:resnet18", "--weights", path, "--T", "4", "--data",
                          "subset"], capsys)
    assert code == 2 and "does not fit" in line and line.endswith("add --num-classes 10"), line


# -- item 6: the examples do what they claim of the paper ------------------------------------------
def test_train_cifar_offers_the_papers_augmentation(load_example):
    """AutoAugment's CIFAR-10 policy and Cutout, per image, on normalised tensors (the paper's A.2)."""
    import torchvision.transforms as T

    from sj_parallel_conversion.tools import data

    train = load_example("train_cifar")
    assert "AutoAugment" in train.__doc__ and "Cutout" in train.__doc__
    args = train.build_parser().parse_args(["--augment", "paper"])
    assert args.augment == "paper" and train.build_parser().parse_args([]).augment == "crop-flip"
    ds = data.cifar10_subset("train", limit=16)
    augment = train.PaperAugment(data.CIFAR10_MEAN, data.CIFAR10_STD)
    assert augment.autoaugment.policy == T.AutoAugmentPolicy.CIFAR10
    torch.manual_seed(0)
    x, y = augment([ds[i] for i in range(16)])
    assert x.shape == (16, 3, 32, 32) and torch.equal(y, ds.tensors[1])
    holes = (x == 0).all(1).flatten(1).sum(1)  # pixels zeroed in every channel, per image
    assert bool((holes >= 8 * 8).all()) and bool((holes <= 16 * 16).all())  # one square, clipped at most to 8x8
    assert not torch.allclose(x, ds.tensors[0])


def test_cutout_zeroes_one_square_per_image():
    from importlib import util

    spec = util.spec_from_file_location("train_cifar", ROOT / "examples" / "train_cifar.py")
    train = util.module_from_spec(spec)
    spec.loader.exec_module(train)
    torch.manual_seed(1)
    out = train.cutout(torch.ones(64, 2, 32, 32), 16)
    zero = (out == 0).all(1)
    for img in zero:
        rows, cols = img.any(1).nonzero().flatten(), img.any(0).nonzero().flatten()
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
        assert int(img.sum()) == len(rows) * len(cols)  # a rectangle: the square clipped at the border


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """val/ and train/ ImageFolders of random 32x32 images, two classes each."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("val", "train"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_imagenet_example_needs_its_own_calibration_folder(load_example, imagefolder, tmp_path, capsys):
    example = load_example("imagenet_training_free")
    with pytest.raises(SystemExit) as exc:
        example.main(["--data-root", str(imagefolder)])
    assert exc.value.code == 2 and "--calib-root" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="holds the evaluation images of --data-root"):
        example.main(["--data-root", str(imagefolder), "--calib-root", str(imagefolder / "val"), "--image-size", "32"])
    # A folder that holds the evaluation folder (ImageFolder would read it as one more class) too.
    import shutil

    nested = tmp_path / "nested"
    shutil.copytree(imagefolder / "val", nested / "val")
    with pytest.raises(SystemExit, match="holds the evaluation images of --data-root"):
        example.main(["--data-root", str(nested), "--calib-root", str(nested), "--image-size", "32"])


@pytest.mark.parametrize("stem", ["--keep-stem-analog", "--no-keep-stem-analog"])
def test_imagenet_example_keeps_the_stem_analog_as_the_paper_does(load_example, imagefolder, stem):
    from sj_parallel_conversion.graph import AnalogReLU

    argv = ["--data-root", str(imagefolder), "--calib-root", str(imagefolder), "--num-classes", "2", "--T", "2",
            "--batch-size", "4", "--calib-images", "4", "--image-size", "32", "--count-domain", "--device", "cpu"]
    r = load_example("imagenet_training_free").main(argv if stem == "--keep-stem-analog" else [*argv, stem])
    assert r["calibration_folder"].endswith("train") and r["evaluation_folder"].endswith("val")
    assert r["calibration_images"] == 4
    stem_module = dict(r["snn"].named_modules())["relu"]  # the first call of torchvision's shared relu
    if stem == "--keep-stem-analog":  # the default
        assert r["analog_sites"] == ["relu"] and isinstance(stem_module, AnalogReLU)
    else:
        assert r["analog_sites"] == [] and isinstance(stem_module, ParallelConversionNode)


def test_readme_cites_the_papers_six_authors():
    """The ICML 2025 paper (arXiv 2412.13610 v2) lists six authors."""
    readme = (ROOT / "README.md").read_text()
    for name in ("Zecheng Hao", "Qichao Ma", "Kang Chen", "Yi Zhang", "Zhaofei Yu", "Tiejun Huang"):
        assert name in readme, name
