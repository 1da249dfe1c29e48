"""The CLI's file contract: no unpickling, outputs checked first and never destroyed, one-line
errors with exit 2, Ctrl-C exits 130, and any user model through --model/--weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sj_parallel_conversion import load_snn
from sj_parallel_conversion.tools import cli, models

from cli_run import run_cli
from cli_user_models import public_layout_weights
from test_files import crafted_file

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def digits_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "digits.pt"
    models.save_checkpoint(str(path), models.build_model("digits_cnn", in_channels=1), name="digits_cnn",
                           act="relu", L=8, num_classes=10, in_channels=1)
    return path


# DIGITS_DATA for --snn, which refuses calibration options; DIGITS for the ANN sources.
DIGITS_DATA = ["--data", "digits", "--batch-size", "32", "--no-progress"]
DIGITS = [*DIGITS_DATA, "--calib-images", "32", "--method", "ema"]


def test_crafted_file_runs_nothing_through_any_subcommand(tmp_path, capsys):
    evil, marker = crafted_file(tmp_path)
    out = tmp_path / "out.pt"
    commands = [
        ["convert", "--checkpoint", evil, "--T", "4", "--out", out],
        ["convert", "--model", "digits_cnn", "--weights", evil, "--T", "4", "--out", out],
        ["evaluate", "--checkpoint", evil, "--T", "4"],
        ["evaluate", "--snn", evil],
        ["evaluate", "--model", "torchvision:resnet18", "--weights", evil, "--T", "4"],
        ["compare", "--checkpoint", evil],
        ["compare", "--model", "cli_user_models:factory", "--weights", evil],
        ["stats", "--checkpoint", evil, "--T", "4"],
        ["stats", "--snn", evil],
        ["search-t", "--checkpoint", evil],
        ["search-t", "--model", "resnet20", "--weights", evil],
    ]
    for argv in commands:
        code, _, err = run_cli([*argv, "--data", "digits"], capsys)
        line = _one_error_line(err)
        assert code == 2 and "only pickle can load" in line and str(evil) in line, (argv, err)
    assert not marker.exists() and not out.exists()


def test_out_equal_to_input_is_refused(digits_ckpt, tmp_path, capsys):
    before = digits_ckpt.read_bytes()
    code, _, err = run_cli(["convert", "--checkpoint", digits_ckpt, "--T", "4", "--out", digits_ckpt, *DIGITS], capsys)
    assert code == 2 and "same file as the input" in _one_error_line(err)
    assert digits_ckpt.read_bytes() == before
    os.symlink(digits_ckpt, tmp_path / "alias.pt")
    code, _, err = run_cli(["convert", "--checkpoint", digits_ckpt, "--T", "4", "--out", tmp_path / "alias.pt", *DIGITS],
                        capsys)
    assert code == 2 and "same file" in err and digits_ckpt.read_bytes() == before


@pytest.mark.parametrize("flag", ["--json", "--csv", "--plot"])
def test_output_paths_are_checked_before_loading(tmp_path, capsys, flag):
    # The checkpoint does not exist: an error about the output proves it was checked first.
    code, _, err = run_cli(["evaluate", "--checkpoint", tmp_path / "missing.pt", "--T", "4", flag, tmp_path], capsys)
    assert code == 2 and f"{flag} '{tmp_path}' is a directory" in _one_error_line(err)
    code, _, err = run_cli(["evaluate", "--checkpoint", tmp_path / "missing.pt", "--T", "4", flag,
                         tmp_path / "no" / "x"], capsys)
    assert code == 2 and "does not exist" in err and "missing.pt" not in err


@pytest.mark.parametrize("kind", ["empty", "garbage", "directory", "state_dict_only"])
def test_bad_input_files_one_line_exit_2(tmp_path, capsys, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(256))
    elif kind == "directory":
        path.mkdir()
    else:  # a plain state_dict given where the project's checkpoint is expected
        torch.save(models.build_model("digits_cnn", in_channels=1).state_dict(), path)
    code, _, err = run_cli(["stats", "--checkpoint", path, "--T", "4", *DIGITS], capsys)
    assert code == 2 and str(path) in _one_error_line(err)
    code, _, err = run_cli(["evaluate", "--snn", path, *DIGITS_DATA], capsys)
    assert code == 2 and str(path) in _one_error_line(err)


@pytest.mark.parametrize("failure", ["disk full", "ctrl-c"])
def test_failed_or_interrupted_convert_keeps_previous_output(digits_ckpt, tmp_path, capsys, monkeypatch, failure):
    out = tmp_path / "snn.pt"
    code, _, err = run_cli(["convert", "--checkpoint", digits_ckpt, "--T", "4", "--out", out, *DIGITS], capsys)
    assert code == 0, err
    before = out.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device") if failure == "disk full" else KeyboardInterrupt()

    monkeypatch.setattr(torch, "save", failing_save)
    code, _, err = run_cli(["convert", "--checkpoint", digits_ckpt, "--T", "8", "--out", out, *DIGITS], capsys)
    line = _one_error_line(err)
    if failure == "disk full":
        assert code == 2 and "No space left" in line and str(out) in line
    else:
        assert code == 130 and "interrupted" in line
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["digits.pt", "snn.pt"]  # no temporary file left
    assert load_snn(out).snn_metadata["T"] == 4


def _tiny_cifar_npz(folder: Path) -> np.ndarray:
    """A CIFAR-10-format npz pair (uint8 NHWC images, int64 labels) with a known label mix."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    labels = np.array([0] * 12 + [9] * 4 + [3] * 24, dtype=np.int64)
    for split, n in (("train", 64), ("test", len(labels))):
        y = labels if split == "test" else rng.integers(0, 10, n)
        np.savez(folder / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=y)
    return labels


def test_evaluate_user_model_with_public_layout_weights(tmp_path, capsys):
    labels = _tiny_cifar_npz(tmp_path / "cifar")
    weights = tmp_path / "public_layout.pth"
    torch.save(public_layout_weights(), weights)
    common = ["evaluate", "--model", "cli_user_models:factory", "--weights", weights, "--T", "8",
              "--data", "npz", "--data-root", tmp_path / "cifar", "--limit", "40", "--calib-images", "32",
              "--batch-size", "32", "--no-progress", "--method", "ema"]
    # With mean 1 and std 1 every normalised image is negative, and the model answers class 0.
    code, out, err = run_cli([*common, "--mean", "1", "1", "1", "--std", "1", "1", "1", "--json", tmp_path / "e.json"],
                          capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "e.json").read_text())["rows"]}
    assert rows["ann"]["accuracy"] == pytest.approx(np.mean(labels == 0))
    assert rows["parallel-count"]["accuracy"] == pytest.approx(np.mean(labels == 0))
    # The dataset's own normalisation leaves the random images mostly positive: class 9.
    code, out, err = run_cli([*common, "--json", tmp_path / "d.json"], capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "d.json").read_text())["rows"]}
    assert rows["ann"]["accuracy"] != pytest.approx(np.mean(labels == 0))


def test_user_model_errors_are_one_line(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    blob = public_layout_weights()
    blob["state_dict"]["module.fc.weight"] = torch.zeros(5, 2)
    del blob["state_dict"]["module.conv.bias"]
    torch.save(blob, weights)
    code, _, err = run_cli(["evaluate", "--model", "cli_user_models:factory", "--weights", weights, "--T", "4",
                         "--data", "digits"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "missing keys ['conv.bias']" in line and "fc.weight: file (5, 2) vs model (10, 2)" in line
    for spec, pattern in (("no_such_module:f", "cannot import module 'no_such_module'"),
                          ("cli_user_models:nope", "has no attribute 'nope'"),
                          ("torchvision:resnet7", "unknown torchvision model 'resnet7'"),
                          ("resnet21", "unknown model 'resnet21'")):
        code, _, err = run_cli(["compare", "--model", spec, "--weights", weights, "--data", "digits"], capsys)
        assert code == 2 and pattern in _one_error_line(err), err
    code, _, err = run_cli(["compare", "--model", "resnet20", "--data", "digits"], capsys)
    assert code == 2 and "--model needs --weights" in err
    code, _, err = run_cli(["compare", "--checkpoint", weights, "--mean", "0.5", "--data", "digits"], capsys)
    assert code == 2 and "--mean and --std go together" in err


def test_factory_found_in_the_working_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_wd_models.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    # Ten outputs for the ten digit classes: the weights fit only if --num-classes reaches the factory.
    state = {"1.weight": torch.randn(16, 64), "1.bias": torch.zeros(16), "3.weight": torch.randn(10, 16),
             "3.bias": torch.zeros(10)}
    torch.save({"model": state, "epoch": 1}, tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_wd_models", raising=False)
    code, out, err = run_cli(["evaluate", "--model", "my_wd_models:tiny", "--num-classes", "10", "--weights", "w.pt",
                           "--T", "2", "--limit", "8", *DIGITS], capsys)
    assert code == 0, err
    assert "parallel" in out
    assert str(tmp_path) not in sys.path  # the working directory was searched, not added for good


@pytest.mark.slow  # a fresh interpreter imports torch and SpikingJelly
def test_entry_point_refuses_crafted_snn(tmp_path):
    """A fresh interpreter through ``python -m``: exit 2, one line, nothing run."""
    evil, marker = crafted_file(tmp_path, "evil_snn.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "sj_parallel_conversion", "stats", "--snn", str(evil)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "only pickle can load" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not marker.exists()


def test_debug_shows_the_traceback_and_bugs_exit_1(tmp_path, capsys, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        cli.main(["--debug", "evaluate", "--snn", str(tmp_path / "missing.pt")])

    def buggy(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", buggy)
    code, _, err = run_cli(["evaluate", "--snn", tmp_path / "x.pt"], capsys)
    assert code == 1 and "internal error: ZeroDivisionError" in _one_error_line(err) and "--debug" in err


@pytest.mark.parametrize("in_a_job", [True, False])
def test_a_connection_closed_by_another_process_of_the_job_is_not_called_a_bug(in_a_job, tmp_path, capsys,
                                                                               monkeypatch):
    """Under torchrun a user error on one rank reaches the others as a closed connection: they
    point at that process's error instead of reporting a bug; outside a job it stays a bug."""
    from sj_parallel_conversion import distributed

    def peer_gone(args):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:64220")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", peer_gone)
    monkeypatch.setattr(distributed, "is_distributed", lambda: in_a_job)
    code, _, err = run_cli(["evaluate", "--snn", tmp_path / "x.pt"], capsys)
    line = _one_error_line(err)
    assert code == 1 and ("another process of this torchrun job stopped" in line) is in_a_job, line
    assert ("internal error" in line) is not in_a_job


# -- which errors are the user's: exit 2 for bad input, 1 (never disguised) for a bug -------------
@pytest.mark.parametrize("exc", [KeyError("rows"), TypeError("bad operand"), RuntimeError("kernel failed"),
                                 IndexError("list index out of range")])
def test_unexpected_exceptions_are_bugs_not_user_errors(tmp_path, capsys, monkeypatch, exc):
    def buggy(args):
        raise exc

    monkeypatch.setitem(cli.COMMANDS, "evaluate", buggy)
    code, _, err = run_cli(["evaluate", "--snn", tmp_path / "x.pt"], capsys)
    line = _one_error_line(err)
    assert code == 1 and f"internal error: {type(exc).__name__}" in line and "a bug" in line, err
    with pytest.raises(type(exc)):
        cli.main(["--debug", "evaluate", "--snn", str(tmp_path / "x.pt")])


def test_user_models_that_fail_are_user_errors(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(public_layout_weights(), weights)
    base = ["evaluate", "--weights", weights, "--T", "2", "--data", "subset", "--limit", "8", "--no-progress",
            "--calib-images", "8", "--batch-size", "8", "--method", "ema"]
    # forward runs, but torch.fx cannot trace it (TypeError from the tracer)
    code, _, err = run_cli([*base, "--model", "cli_user_models:untraceable"], capsys)
    assert code == 2 and "cannot be traced by torch.fx" in _one_error_line(err) and "TypeError" in err
    code, _, err = run_cli([*base, "--model", "cli_user_models:branching"], capsys)
    assert code == 2 and "cannot be traced by torch.fx" in _one_error_line(err) and "TraceError" in err
    # the factory itself raises
    code, _, err = run_cli([*base, "--model", "cli_user_models:failing"], capsys)
    assert code == 2 and "calling failing() failed: RuntimeError" in _one_error_line(err)
    # a 3-channel model given 1-channel 8x8 digits: named before any calibration
    code, _, err = run_cli(["evaluate", "--model", "cli_user_models:factory", "--weights", weights, "--T", "2",
                         *DIGITS], capsys)
    assert code == 2 and "does not accept --data digits inputs (images of shape (1, 8, 8))" in _one_error_line(err)


def test_saved_snn_given_other_data_is_a_user_error(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "snn.pt"
    assert run_cli(["convert", "--checkpoint", digits_ckpt, "--T", "4", "--out", out, *DIGITS], capsys)[0] == 0
    code, _, err = run_cli(["evaluate", "--snn", out, "--data", "subset", "--limit", "4"], capsys)
    assert code == 2 and f"SNN file '{out}' does not accept --data subset" in _one_error_line(err)
    # stats cannot run a saved network at another T: refused, not ignored
    code, _, err = run_cli(["stats", "--snn", out, "--T", "8", "--images", "4", *DIGITS_DATA], capsys)
    assert code == 2 and "--T 8" in _one_error_line(err) and "converted for T=4" in err
    code, out_text, err = run_cli(["stats", "--snn", out, "--T", "4", "--images", "4", *DIGITS_DATA], capsys)
    assert code == 0 and "at T=4, 4 test images" in out_text, err


def test_bad_device_is_named(capsys):
    code, _, err = run_cli(["evaluate", "--snn", "x.pt", "--device", "nowhere"], capsys)
    assert code == 2 and "--device nowhere" in _one_error_line(err)


def test_device_this_machine_lacks_is_refused_before_any_work(capsys):
    # No machine has a 100th GPU; x.pt does not exist, so naming the device proves it was checked first.
    code, _, err = run_cli(["evaluate", "--snn", "x.pt", "--device", "cuda:99"], capsys)
    line = _one_error_line(err)
    assert code == 2 and line.startswith("sj-parallel: error: --device cuda:99") and "x.pt" not in line, err


CNN = ROOT / "sj_parallel_conversion" / "tools" / "checkpoints" / "cifar10_cnn_relu.pt"
SUBSET = ["--data", "subset", "--batch-size", "16", "--no-progress", "--method", "ema", "--calib-images", "16"]


@pytest.fixture
def no_work(monkeypatch):
    """Any conversion or comparison fails the test: a refusal must come before them."""
    from sj_parallel_conversion import recipe
    from sj_parallel_conversion.tools import compare

    def work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(recipe.ParallelConverter, "convert", work)
    monkeypatch.setattr(compare, "compare_converters", work)


@pytest.mark.parametrize("argv, batch", [
    (["stats", "--images", "4"], "one spike-level batch of 4 images needs at least"),
    (["compare", "--methods", "ann", "parallel"], "one spike-level batch of 16 images needs at least"),
])
def test_T_too_large_for_memory_is_refused_for_stats_and_compare_batches(argv, batch, no_work, capsys):
    code, _, err = run_cli([*argv, "--checkpoint", CNN, "--T", 2 ** 24, *SUBSET], capsys)
    line = _one_error_line(err)
    assert code == 2 and f"at T={2 ** 24}: {batch}" in line and "GiB" in line, err
    assert "lower --T or --batch-size" in line


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 8589934592 bytes"),
    MemoryError(),
], ids=["cuda", "cpu-allocator", "MemoryError"])
def test_out_of_memory_while_evaluating_says_lower_batch_size(exc, monkeypatch, capsys):
    from sj_parallel_conversion import distributed

    real = distributed.distributed_evaluate
    calls = []

    def predict_out_of_memory(x):
        calls.append(len(x))
        raise exc

    # The one-image probe has passed; the real evaluation loop runs out of memory on its first batch.
    monkeypatch.setattr(distributed, "distributed_evaluate",
                        lambda predict, loader, **kw: real(predict_out_of_memory, loader, **kw))
    code, _, err = run_cli(["evaluate", "--checkpoint", CNN, "--T", "4", "--limit", "32", "--device", "cpu", *SUBSET],
                           capsys)
    line = _one_error_line(err)
    assert calls == [16]
    assert code == 2 and line.startswith("sj-parallel: error: out of memory on cpu"), err
    assert "lower --batch-size" in line
    assert "does not accept" not in line and "internal error" not in line


# -- options that do not apply are refused, not ignored -------------------------------------------
@pytest.mark.parametrize("command", ["convert", "search-t"])
def test_limit_is_offered_only_where_test_images_are_read(command, capsys):
    argv = [command, "--checkpoint", "x.pt", "--limit", "10"] + (["--T", "4", "--out", "y.pt"] if command == "convert"
                                                                   else [])
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and "--limit" in capsys.readouterr().err


@pytest.mark.parametrize("argv, pattern", [
    (["convert", "--checkpoint", "x.pt", "--T", "4", "--out", "y.pt", "--method", "ema"], "--method ema"),
    (["convert", "--checkpoint", "x.pt", "--T", "4", "--out", "y.pt", "--calibrate", "no"], "--calibrate no"),
    (["evaluate", "--checkpoint", "x.pt", "--T", "4", "--method", "moment"], "--method moment"),
    (["evaluate", "--checkpoint", "x.pt", "--T", "4", "--method", "mse"], "--method mse"),
    (["convert", "--checkpoint", "x.pt", "--T", "4", "--out", "y.pt", "--method", "paper"], "--method paper"),
    (["stats", "--snn", "x.pt"], "--snn"),
    (["compare", "--checkpoint", "x.pt", "--method", "ema", "--methods", "ann", "parallel", "ltb"], "--method ema"),
    (["compare", "--checkpoint", "x.pt", "--methods", "ann", "ltb"], "--methods ann ltb"),
])
def test_learn_steps_without_learned_calibration_is_refused(argv, pattern, capsys):
    code, _, err = run_cli([*argv, "--learn-steps", "5"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "--learn-steps" in line and pattern in line, err


@pytest.mark.parametrize("argv", [
    ["convert", "--checkpoint", "x.pt", "--T", "4", "--out", "y.pt", "--method", "learned"],
    ["evaluate", "--checkpoint", "x.pt", "--T", "4"],  # auto may keep a learned fit
    ["compare", "--checkpoint", "x.pt", "--methods", "ann", "parallel-learned"],
])
def test_learn_steps_where_learned_calibration_runs(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli._check_args(cli.build_parser().parse_args([*argv, "--learn-steps", "5"]))  # no CLIError


@pytest.mark.parametrize("argv, pattern", [
    (["--data", "digits", "--images", "10"], "images (--images) applies to data='cifar10'"),
    (["--data", "digits", "--baselines", "ltb"], "baselines (--baselines) applies to data='cifar10'"),
    (["--data", "digits", "--learned-T", "4"], "learned_T (--learned-T / --no-learned) applies to data='cifar10'"),
    (["--data", "digits", "--learn-steps", "5"], "learn_steps (--learn-steps) applies to data='cifar10'"),
    (["--epochs", "2"], "epochs (--epochs) applies to data='digits'"),
    (["--calib-images", "1"], "--calib-images) must be an integer in 2..1024"),
])
def test_demo_refuses_options_of_the_other_demo(argv, pattern, tmp_path, capsys):
    code, _, err = run_cli(["demo", "--out", tmp_path / "demo", *argv], capsys)
    assert code == 2 and pattern in _one_error_line(err)
    assert not (tmp_path / "demo").exists()


def test_compare_title_names_a_model_given_by_name(tmp_path, capsys):
    weights = tmp_path / "w.pth"
    torch.save(public_layout_weights(), weights)
    code, out, err = run_cli(["compare", "--model", "cli_user_models:factory", "--weights", weights, "--data", "subset",
                           "--limit", "8", "--methods", "ann", "--T", "2", "--batch-size", "8",
                           "--no-progress", "--json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    title = json.loads((tmp_path / "t.json").read_text())["title"]
    assert title == "cli_user_models:factory on subset, 8 test images" and title in out
