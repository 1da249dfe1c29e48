"""Input checked before any work, in one place for every source of a network (--checkpoint,
--model, --snn): images and labels, --mean/--std, weights' dtypes and fit, output paths, T that
cannot fit in memory, Ctrl-C during the imports and raw pickle files. Each case used to be scored
as "ok", fail late or print a traceback."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sj_parallel_conversion import ParallelConversionRecipe, ParallelConverter, fileio, load_user_model, save_snn
from sj_parallel_conversion.tools import cli, data

from cli_run import run_cli, run_cli_line
from cli_user_models import factory, public_layout_weights, with_batchnorm

ROOT = Path(__file__).resolve().parents[1]
CNN = ROOT / "sj_parallel_conversion" / "tools" / "checkpoints" / "cifar10_cnn_relu.pt"
# Calibration options go with the ANN sources only: --snn refuses them (nothing is calibrated).
CALIB = ["--method", "ema", "--calib-images", "16"]
FAST = ["--no-progress", "--batch-size", "16"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The three ways to name a network, each runnable on CIFAR-shaped images."""
    d = tmp_path_factory.mktemp("sources")
    torch.save(public_layout_weights(), d / "w.pth")
    model = load_user_model("cli_user_models:factory", str(d / "w.pth"))
    x = data.cifar10_subset("train", limit=32).tensors[0]
    for T in (4, 2 ** 24):
        snn = ParallelConverter(ParallelConversionRecipe(T, [x], progress=False, method="ema")).convert(model)
        save_snn(snn, d / f"snn_T{T}.pt", metadata={"T": T})
    return {"checkpoint": ["--checkpoint", CNN, "--T", "4", *CALIB],
            "model": ["--model", "cli_user_models:factory", "--weights", d / "w.pth", "--T", "4", *CALIB],
            "snn": ["--snn", d / "snn_T4.pt"], "dir": d}


def _npz(folder: Path, x, y):
    folder.mkdir(exist_ok=True)
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", x=x, y=y)
    return folder


GOOD_X = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
GOOD_Y = np.arange(20) % 10


@pytest.mark.parametrize("case,pattern", [
    ("float images in [0, 1]", r"images are float32 \(they look scaled to \[0, 1\]"),
    ("int64 images", "images are int64"),
    ("channels first", r"channels first\? transpose"),
    ("labels beyond the classes", "labels range from 0 to 12; expected 0 to 9"),
    ("fewer labels", "20 images but 19 labels"),
    ("float labels", "labels are float64"),
])
@pytest.mark.parametrize("source", ["checkpoint", "model", "snn"])
def test_bad_npz_is_refused_through_every_source(sources, tmp_path, capsys, case, pattern, source):
    x, y = GOOD_X, GOOD_Y
    if case == "float images in [0, 1]":
        x = (x / 255.0).astype(np.float32)
    elif case == "int64 images":
        x = x.astype(np.int64)
    elif case == "channels first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif case == "labels beyond the classes":
        y = y.copy()
        y[3] = 12
    elif case == "fewer labels":
        y = y[:-1]
    else:
        y = y.astype(np.float64)
    root = _npz(tmp_path / "npz", x, y)
    code, out, line = run_cli_line(["evaluate", *sources[source], "--data", "npz", "--data-root", root, *FAST], capsys)
    assert code == 2 and "CIFAR-10 file" in line and "test.npz" in line, line
    assert re.search(pattern, line), line
    assert "parallel" not in out  # no table


@pytest.mark.parametrize("source", ["checkpoint", "model", "snn"])
@pytest.mark.parametrize("values,pattern", [
    (["--mean", "nan", "nan", "nan", "--std", "1", "1", "1"], "--mean values must be finite"),
    (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"], "--std values must be positive"),
    (["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "inf", "0.2"], "--std values must be finite"),
    (["--mean", "0.5", "0.5", "--std", "0.2", "0.2"], "--mean has 2 values but the images have 3 channels"),
])
def test_mean_and_std_are_checked_before_any_work(sources, capsys, source, values, pattern):
    code, _, line = run_cli_line(["evaluate", *sources[source], "--data", "subset", "--limit", "8", *values, *FAST], capsys)
    assert code == 2 and pattern in line and "internal error" not in line, line


def test_mean_length_against_an_npz_of_other_channels(tmp_path, capsys, sources):
    root = _npz(tmp_path / "gray", GOOD_X[..., :1], GOOD_Y)
    code, _, line = run_cli_line(["evaluate", *sources["snn"], "--data", "npz", "--data-root", root, "--mean", "0.5", "0.5",
                          "--std", "0.2", "0.2", *FAST], capsys)
    assert code == 2 and "mean has 2 values but the images have 1 channels" in line, line


def test_labels_beyond_the_model_outputs_are_refused(sources, tmp_path, capsys):
    torch.save(factory(5).state_dict(), tmp_path / "five.pth")
    code, _, line = run_cli_line(["evaluate", "--model", "cli_user_models:factory", "--num-classes", "5", "--weights",
                          tmp_path / "five.pth", "--T", "4", "--data", "subset", "--limit", "20", *CALIB, *FAST], capsys)
    assert code == 2 and "labels go up to 9 but cli_user_models:factory has 5 outputs" in line, line


def test_integer_weights_are_refused_not_converted(tmp_path, capsys):
    state = {k: v.round().to(torch.int64) if v.is_floating_point() else v
             for k, v in factory().state_dict().items()}
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(ValueError, match=r"integer tensors where model 'cli_user_models:factory' has floating-point "
                                         r"weights: \['conv.weight \(torch.int64\)'"):
        load_user_model("cli_user_models:factory", str(tmp_path / "int.pth"))
    code, _, line = run_cli_line(["evaluate", "--model", "cli_user_models:factory", "--weights", tmp_path / "int.pth",
                          "--T", "4", "--data", "subset", *CALIB, *FAST], capsys)
    assert code == 2 and "integer tensors" in line


def test_weights_fit_is_decided_by_load_state_dict(tmp_path, capsys):
    """A BatchNorm saved by an older PyTorch (no num_batches_tracked) loads as torch loads it; a
    state whose versions say it should have one is refused, listing what torch found missing."""
    model = with_batchnorm().eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 50.0}, tmp_path / "old.th")
    loaded = load_user_model("cli_user_models:with_batchnorm", str(tmp_path / "old.th"))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    code, out, line = run_cli_line(["evaluate", "--model", "cli_user_models:with_batchnorm", "--weights", tmp_path / "old.th",
                            "--T", "4", "--data", "subset", "--limit", "20", *CALIB, *FAST], capsys)
    assert code == 0 and "parallel" in out, line
    # Saved by a PyTorch that writes num_batches_tracked (BatchNorm version 2), yet without it.
    modern = model.state_dict()
    del modern["bn.num_batches_tracked"]
    torch.save(modern, tmp_path / "modern.pth")
    with pytest.raises(ValueError, match=r"does not fit model .*missing keys \['bn.num_batches_tracked'\]"):
        load_user_model("cli_user_models:with_batchnorm", str(tmp_path / "modern.pth"))


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses new files even to root
        if not os.path.isdir("/sys"):
            pytest.skip("no folder that refuses root's writes")
        return Path("/sys")
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    return folder


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    # The checkpoint does not exist: an error about the output proves the output was checked first.
    missing = tmp_path / "missing.pt"
    cases = [("", "--out: empty path"), (f"{tmp_path}/newdir/", "ends with a path separator"),
             (str(_unwritable_folder(tmp_path) / "x.pt"), "cannot create files in folder")]
    for out, pattern in cases:
        code, _, line = run_cli_line(["convert", "--checkpoint", missing, "--T", "4", "--out", out], capsys)
        assert code == 2 and pattern in line and "missing.pt" not in line, (out, line)
        code, _, line = run_cli_line(["evaluate", "--checkpoint", missing, "--T", "4", "--json", out], capsys)
        assert code == 2 and pattern.replace("--out", "--json") in line, (out, line)


@pytest.mark.parametrize("command", ["evaluate", "compare", "stats"])
def test_a_plot_format_matplotlib_cannot_write_is_refused_before_any_work(tmp_path, capsys, command):
    missing = tmp_path / "missing.pt"
    for plot, why in (("c.xyz", "'.xyz' is not a format matplotlib writes"),
                      ("c", "it has no extension to name the format")):
        code, _, line = run_cli_line([command, "--checkpoint", missing, "--T", "4", "--plot", tmp_path / plot], capsys)
        assert code == 2 and f"--plot '{tmp_path / plot}': {why}; use one of " in line and ".png" in line, line
        assert "missing.pt" not in line and not (tmp_path / plot).exists()


def test_T_whose_spike_level_run_cannot_fit_is_refused_with_the_estimate(sources, tmp_path, capsys):
    out = tmp_path / "huge.pt"
    code, _, line = run_cli_line(["convert", "--checkpoint", CNN, "--T", "1000000000", "--out", out, "--data", "subset",
                          *CALIB, *FAST], capsys)
    assert code == 2 and "at T=1000000000: the converted network needs for one image at least" in line, line
    assert "GiB" in line and "lower --T" in line and not out.exists()
    big = sources["dir"] / f"snn_T{2 ** 24}.pt"
    code, _, line = run_cli_line(["evaluate", "--snn", big, "--mode", "spike", "--data", "subset", "--limit", "8", *FAST],
                         capsys)
    assert code == 2 and "one spike-level batch of 8 images needs at least" in line, line
    assert "does not accept" not in line  # not reported as a data mismatch
    # The count domain needs no time steps in memory: the same file evaluates there.
    code, out_text, line = run_cli_line(["evaluate", "--snn", big, "--data", "subset", "--limit", "8", *FAST], capsys)
    assert code == 0 and "16777216" in out_text, line


def test_out_of_memory_is_not_reported_as_a_data_mismatch(sources, capsys, monkeypatch):
    from sj_parallel_conversion import inference

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(inference, "count_domain_model", lambda snn: no_memory)
    code, _, line = run_cli_line(["evaluate", *sources["snn"], "--data", "subset", "--limit", "8", *FAST], capsys)
    assert code == 2 and "out of memory running one image" in line and "does not accept" not in line, line


def test_ctrl_c_during_the_imports_prints_one_line(tmp_path):
    """Ctrl-C while the command is still importing torch: one line and status 130."""
    script = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['sj-parallel', 'evaluate', '--help']\n"
        "from sj_parallel_conversion.tools.cli import main\n"
        "sys.exit(main())\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 130 and res.stderr.strip().splitlines() == [
        "sj-parallel: interrupted (no output file was written or changed)"], res.stderr
    # A program that merely imports the package keeps Python's own behaviour.
    plain = script.replace("sys.argv = ['sj-parallel', 'evaluate', '--help']\n", "")
    res = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode != 130 and "KeyboardInterrupt" in res.stderr


def test_raw_pickle_is_refused_without_torchs_warning(tmp_path, capsys):
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"state_dict": {"w": [1.0]}}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fileio.FileError, match="raw.pkl"):
            fileio.load_tensor_file(tmp_path / "raw.pkl")
    assert not caught, [str(w.message) for w in caught]
    code, _, line = run_cli_line(["evaluate", "--snn", tmp_path / "raw.pkl"], capsys)
    assert code == 2 and "raw.pkl" in line


def test_compare_of_the_ann_alone_needs_no_training_split(tmp_path, capsys):
    """`compare --methods ann` calibrates nothing, so a folder with test.npz alone will do; a
    method that calibrates is refused there with one line naming the missing file."""
    folder = tmp_path / "test_only"
    folder.mkdir()
    np.savez(folder / "test.npz", x=GOOD_X, y=GOOD_Y)
    common = ["compare", "--checkpoint", CNN, "--data", "npz", "--data-root", folder, "--repeats", "1", *FAST]
    code, out, line = run_cli_line([*common, "--methods", "ann", "--json", tmp_path / "t.json"], capsys)
    assert code == 0 and line == "", line
    (row,) = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert row["method"] == "ann" and row["images"] == 20
    code, _, line = run_cli_line([*common, "--methods", "ann", "parallel-count", "--T", "4"], capsys)
    assert code != 0 and "train.npz" in line, line


def test_result_files_record_what_the_run_used(sources, tmp_path, capsys):
    """docs/cli.rst: provenance holds the settings the options resolved to; a saved network's run
    records no calibration settings, and stats' JSON says what it measured."""
    import json

    ev = tmp_path / "ev.json"
    # More calibration (then test) images asked for than the shipped subset holds (1,024 / 1,000).
    code, _, err = run_cli(["evaluate", "--checkpoint", CNN, "--T", "4", "--method", "ema", "--calib-images", "5000",
                            "--data", "subset", "--limit", "8", "--mean", "0.5", "0.5", "0.5",
                            "--std", "0.25", "0.25", "0.25", "--json", ev, *FAST], capsys)
    assert code == 0, err
    run = json.loads(ev.read_text())["provenance"]
    assert run["calib_images"] == 1024 and run["limit"] == 8
    assert run["mean"] == [0.5, 0.5, 0.5] and run["std"] == [0.25, 0.25, 0.25]
    assert run["method"] == "ema" and run["alpha"] == 0.99 and run["seed"] == 0
    code, _, err = run_cli(["evaluate", *sources["snn"], "--data", "subset", "--limit", "5000", "--json", ev,
                            "--no-progress", "--batch-size", "500"], capsys)
    assert code == 0, err
    doc = json.loads(ev.read_text())
    run = doc["provenance"]
    assert run["limit"] == 1000
    assert not {"method", "alpha", "calib_images", "seed"} & set(run) and run["snn"].endswith("snn_T4.pt")
    assert run["mean"] == "the default of --data subset" and doc["rows"][0]["calibration"] == "ema"
    st = tmp_path / "st.json"
    code, _, err = run_cli(["stats", *sources["snn"], "--data", "subset", "--images", "8", "--json", st, *FAST], capsys)
    assert code == 0, err
    doc = json.loads(st.read_text())
    assert doc["T"] == 4 and doc["calibration"] == "ema" and doc["machine"] and doc["model"]
    assert doc["provenance"]["command"].startswith("sj-parallel stats") and doc["provenance"]["torch"]


def test_a_saved_network_is_evaluated_with_the_normalisation_it_was_converted_with(tmp_path, capsys):
    import json

    snn, ev = tmp_path / "snn.pt", tmp_path / "ev.json"
    norm = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    code, _, err = run_cli(["convert", "--checkpoint", CNN, "--T", "4", *CALIB, "--data", "subset", *norm,
                            "--out", snn, *FAST], capsys)
    assert code == 0, err
    code, _, err = run_cli(["evaluate", "--snn", snn, "--data", "subset", "--limit", "8", "--json", ev, *FAST], capsys)
    assert code == 0, err
    run = json.loads(ev.read_text())["provenance"]
    assert run["mean"] == [0.5, 0.5, 0.5] and run["std"] == [0.25, 0.25, 0.25]
    code, _, line = run_cli_line(["stats", "--snn", snn, "--data", "subset", "--images", "8", "--mean", "0.4", "0.5",
                                  "0.5", "--std", "0.25", "0.25", "0.25", *FAST], capsys)
    assert code == 2 and "--mean 0.4 0.5 0.5 differs from the mean" in line and "0.5 0.5 0.5" in line, line
