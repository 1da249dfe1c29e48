"""The command line: one-line errors for user mistakes, and the subcommands end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sj_parallel_conversion.tools import cli

from cli_run import run_cli


@pytest.mark.parametrize("argv, pattern", [
    (["convert", "--checkpoint", "no/such.pt", "--T", "4", "--out", "x.pt"], "checkpoint 'no/such.pt' does not exist"),
    (["evaluate", "--snn", "no/such.pt"], "SNN file 'no/such.pt' does not exist"),
    (["compare", "--checkpoint", "no/such.pt"], "does not exist"),
    (["stats", "--snn", "no/such.pt"], "does not exist"),
])
def test_bad_paths_give_one_line_errors(argv, pattern, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sj-parallel: error: ") and pattern in lines[0], err


@pytest.mark.parametrize("bad", ["0", "-3", "four"])
def test_non_positive_T_is_an_argument_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert", "--checkpoint", "x.pt", "--T", bad, "--out", "y.pt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "positive integer" in err and "Traceback" not in err


def test_unknown_model_and_mismatched_checkpoint(tmp_path, capsys):
    from sj_parallel_conversion.tools import models

    bad_name = tmp_path / "bad_name.pt"
    torch.save({"name": "no-such-net", "act": "relu", "L": 8, "num_classes": 10, "in_channels": 3,
                "state_dict": {}}, bad_name)
    code, _, err = run_cli(["compare", "--checkpoint", str(bad_name), "--data", "digits"], capsys)
    assert code == 2 and "no-such-net" in err and len(err.strip().splitlines()) == 1
    # a digits CNN's weights under a CIFAR CNN's name: the shapes do not match
    good = tmp_path / "digits.pt"
    models.save_checkpoint(str(good), models.build_model("digits_cnn", in_channels=1), name="digits_cnn",
                           act="relu", L=8, num_classes=10, in_channels=1)
    blob = torch.load(good, weights_only=False)
    blob["name"] = "cnn"
    blob["in_channels"] = 3
    torch.save(blob, tmp_path / "mismatch.pt")
    code, _, err = run_cli(["compare", "--checkpoint", str(tmp_path / "mismatch.pt"), "--data", "digits"], capsys)
    assert code == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # every subcommand, a comparison included
def test_convert_evaluate_stats_compare_on_digits(tmp_path, capsys):
    """A digits CNN trained for one epoch goes through every subcommand."""
    from torch.utils.data import DataLoader

    from sj_parallel_conversion.tools import data, models
    from sj_parallel_conversion.tools.training import train_classifier

    torch.manual_seed(0)
    m = models.build_model("digits_cnn", in_channels=1, act="relu")
    train_classifier(m, DataLoader(data.digits("train"), batch_size=64, shuffle=True), 2, lr=0.05, progress=False)
    ckpt = tmp_path / "digits.pt"
    models.save_checkpoint(str(ckpt), m, name="digits_cnn", act="relu", L=8, num_classes=10, in_channels=1,
                           extra={"input_size": (8, 8)})
    snn_file = tmp_path / "snn.pt"
    data_opts = ["--data", "digits", "--batch-size", "64"]
    common = [*data_opts, "--calib-images", "256", "--method", "ema"]  # --snn refuses calibration options
    code, out, err = run_cli(["convert", "--checkpoint", str(ckpt), "--T", "8", "--out", str(snn_file), *common], capsys)
    assert code == 0, err
    assert "wrote" in out and snn_file.is_file()
    code, out, err = run_cli(["evaluate", "--snn", str(snn_file), "--mode", "spike", "--json", str(tmp_path / "e.json"),
                           *data_opts], capsys)
    assert code == 0, err
    spike_acc = json.loads((tmp_path / "e.json").read_text())["rows"][0]["accuracy"]
    code, out, err = run_cli(["evaluate", "--snn", str(snn_file), "--mode", "count", "--json", str(tmp_path / "c.json"),
                           *data_opts], capsys)
    assert code == 0, err
    count_acc = json.loads((tmp_path / "c.json").read_text())["rows"][0]["accuracy"]
    assert abs(spike_acc - count_acc) <= 2 / 450 and spike_acc > 0.5
    code, out, err = run_cli(["stats", "--snn", str(snn_file), "--images", "64", "--plot", str(tmp_path / "s.png"),
                           *data_opts], capsys)
    assert code == 0, err
    assert "SOPs" in out and (tmp_path / "s.png").stat().st_size > 1000
    code, out, err = run_cli(["compare", "--checkpoint", str(ckpt), "--T", "4", "8", "--methods", "ann", "parallel",
                           "parallel-count", "ltb", "--csv", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "t.png"),
                           "--no-progress", *common], capsys)
    assert code == 0, err
    assert "it/s" not in err and "s/it" not in err  # SpikingJelly's own LTB bar is silenced too
    assert "SJ LocalThresholdBalancing" in out and (tmp_path / "t.png").stat().st_size > 1000
    rows = (tmp_path / "t.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 1 + 2 * 2 + 2
    # Every row names the calibration its network got: Algorithm 1 here, SpikingJelly's own for LTB.
    import csv
    table = list(csv.DictReader(rows))
    assert {r["calibration"] for r in table if r["method"].startswith("parallel")} == {"ema"}
    assert {r["calibration"] for r in table if r["method"] == "ltb"} == {"SpikingJelly: local threshold balancing"}
    assert "| calibration |" in out.replace("  ", " ") or "calibration" in out.splitlines()[1]
    code, out, err = run_cli(["evaluate", "--checkpoint", str(ckpt), "--T", "4", "--json", str(tmp_path / "a.json"),
                           *data_opts, "--calib-images", "256", "--learn-steps", "10"], capsys)
    assert code == 0, err
    assert "sj-parallel: calibration (auto): kept " in err  # auto's choice, on stderr
    doc = json.loads((tmp_path / "a.json").read_text())
    rows = doc["rows"]
    assert rows[0]["calibration"] == "" and rows[1]["calibration"].endswith("(auto)")
    # Provenance: versions, the machine, the command and the settings the options resolved to.
    run = doc["provenance"]
    assert doc["machine"] and run["torch"] == torch.__version__ and run["spikingjelly"] != "not installed"
    assert run["command"].startswith("sj-parallel evaluate") and run["calib_images"] == 256
    assert run["learn_steps"] == 10 and run["method"] == "auto" and run["T"] == [4]


def test_method_auto_prints_its_choice_on_stderr(tmp_path, capsys):
    """docs/cli.rst: with --method auto "the choice is printed on stderr" -- the one the table names."""
    from pathlib import Path

    cnn = Path(cli.__file__).parent / "checkpoints" / "cifar10_cnn_relu.pt"
    code, _, err = run_cli(["evaluate", "--checkpoint", cnn, "--T", "4", "--data", "subset", "--limit", "8",
                            "--calib-images", "16", "--batch-size", "16", "--no-progress",
                            "--json", tmp_path / "e.json"], capsys)
    assert code == 0, err
    kept = json.loads((tmp_path / "e.json").read_text())["rows"][1]["calibration"]
    assert kept.endswith("(auto)") and f"sj-parallel: calibration (auto): kept {kept};" in err, err


@pytest.mark.slow  # a fresh interpreter imports torch and SpikingJelly
def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "sj_parallel_conversion", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout and "compare" in res.stdout


def test_search_t_split_is_fixed_disjoint_and_seeded():
    """search-t scores on held-out training images in an order fixed by --seed."""
    def split(seed, batches=2):
        args = cli.build_parser().parse_args(["search-t", "--checkpoint", "x.pt", "--data", "digits", "--batch-size",
                                              "32", "--search-batches", str(batches), "--seed", str(seed)])
        calib, search = cli._search_loaders(args)
        return calib.dataset.indices, search.dataset.indices, calib, search

    c0, s0, calib, search = split(0)
    assert len(s0) == 64 and not set(c0) & set(s0)
    # calibration: the next --calib-images (default 1024) images of the same order
    assert len(c0) == min(cli.CALIB_IMAGES, len(calib.dataset.dataset) - 64)
    c1, s1, _, _ = split(0)
    assert (c0, s0) == (c1, s1)
    assert split(1)[1] != s0
    # Each pass yields the same batches (no reshuffling between trials).
    first = [x for x, _ in search]
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in search]))
    args = cli.build_parser().parse_args(["search-t", "--checkpoint", "x.pt", "--data", "digits", "--batch-size", "64",
                                          "--search-batches", "100"])
    with pytest.raises(cli.CLIError, match="none would be left for calibration"):
        cli._search_loaders(args)


@pytest.mark.slow  # two per-layer searches
def test_search_t_is_reproducible(tmp_path, capsys):
    from torch.utils.data import DataLoader

    from sj_parallel_conversion.tools import data, models
    from sj_parallel_conversion.tools.training import train_classifier

    torch.manual_seed(0)
    m = models.build_model("digits_cnn", in_channels=1, act="relu")
    train_classifier(m, DataLoader(data.digits("train"), batch_size=64, shuffle=True), 1, lr=0.05, progress=False)
    ckpt = tmp_path / "digits.pt"
    models.save_checkpoint(str(ckpt), m, name="digits_cnn", act="relu", L=8, num_classes=10, in_channels=1,
                           extra={"input_size": (8, 8)})
    results = []
    for i in range(2):
        out = tmp_path / f"s{i}.json"
        code, _, err = run_cli(["search-t", "--checkpoint", str(ckpt), "--data", "digits", "--batch-size", "64",
                             "--calib-images", "128", "--search-batches", "3", "--T-max", "8", "--candidates", "2",
                             "4", "--json", str(out)], capsys)
        assert code == 0, err
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]
    assert len(results[0]["trials"]) > 1
