"""The main job: ``sj-parallel demo`` on the shipped ResNet-20 and CIFAR-10 subset, from anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sj_parallel_conversion.tools import cli
from sj_parallel_conversion.tools.demo import CIFAR_CHECKPOINT, run_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(data="mnist"), "data must be one of"),
    (dict(test_images=1001), r"test_images \(--images\) must be an integer in 1..1000"),
    (dict(calib_images=0), r"calib_images \(--calib-images\) must be an integer in 2..1024"),
    (dict(baselines=("rate-cw",)), "unknown baselines"),
    (dict(T_list=[4, 0]), "T_list must hold integers >= 1"),
    (dict(learned_T=[2]), r"learned_T \[2\] not among the T"),
    (dict(learned_T=[0]), "learned_T must hold integers >= 1"),
    (dict(learn_images=1025), r"learn_images \(--learn-images\) must be an integer in 4..1024"),
    (dict(learn_steps=0), "LearnedCalibration.steps must be an integer >= 1"),
    (dict(repeats=0), "repeats must be an integer >= 1"),
    (dict(data="digits", repeats=1.5), "repeats must be an integer >= 1"),
    # options of the other demo are refused, not ignored
    (dict(data="digits", test_images=10), r"test_images \(--images\) applies to data='cifar10'"),
    (dict(data="digits", learn_steps=5), r"learn_steps \(--learn-steps\) applies to data='cifar10'"),
    (dict(epochs=2), r"epochs \(--epochs\) applies to data='digits' \(demo --data digits\) only"),
    (dict(L=3), r"L applies to data='digits'"),
    (dict(data="digits", L=0), "L must be an integer >= 1"),
])
def test_run_demo_rejects_bad_arguments_before_any_work(kwargs, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        run_demo(out_dir=str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_demo_rejects_more_images_than_shipped(capsys):
    assert cli.main(["demo", "--images", "5000"]) == 2
    assert "--images) must be an integer in 1..1000 (the shipped CIFAR-10 subset holds 1000 test" in capsys.readouterr().err


@pytest.mark.parametrize("argv, learned_T", [
    ([], None),                               # default: T = 4 where converted
    (["--learned-T", "8", "16"], [8, 16]),
    (["--learned-T"], []),                    # no value: none
    (["--no-learned"], ()),
])
def test_cli_demo_passes_the_learned_T_choice(argv, learned_T, monkeypatch):
    from sj_parallel_conversion.tools import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert cli.main(["demo", *argv]) == 0
    assert seen["learned_T"] == learned_T
    # options not given reach run_demo as None, which takes its own defaults (one place for them)
    assert seen["learn_steps"] is None and seen["test_images"] is None and seen["repeats"] == demo.REPEATS


def test_cli_demo_rejects_conflicting_or_oversized_learned_options(capsys):
    assert cli.main(["demo", "--learn-images", "2048"]) == 2
    assert "--learn-images) must be an integer in 4..1024" in capsys.readouterr().err
    assert cli.main(["demo", "--learn-images", "1"]) == 2
    assert "got 1" in capsys.readouterr().err
    assert cli.main(["demo", "--data", "digits", "--no-learned"]) == 2
    assert "learned_T (--learned-T / --no-learned) applies to data='cifar10'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--no-learned", "--learned-T", "4"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_demo_checkpoint_ships_with_the_package():
    assert CIFAR_CHECKPOINT.is_file() and CIFAR_CHECKPOINT.parent.parent == Path(cli.__file__).parent


@pytest.mark.slow  # converts ResNet-20 five times (one learned fit) and runs an IF network for 32 steps (2-3 minutes)
def test_demo_runs_from_an_empty_folder_without_the_dataset(tmp_path):
    env = dict(os.environ)
    env.pop("SJPC_CIFAR10_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    res = subprocess.run([sys.executable, "-m", "sj_parallel_conversion", "demo", "--no-progress"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for label in ("SJ RateCodingRecipe 99.9%, channel-wise, half threshold (IF)",
                  "parallel SNN, Algorithm 1 (count-domain)", "parallel SNN, learned calibration (count-domain)"):
        assert label in res.stdout
    out = tmp_path / "runs" / "demo"
    assert (out / "accuracy_speed.png").stat().st_size > 1000 and (out / "table.md").is_file()
    doc = json.loads((out / "table.json").read_text())
    assert doc["timed_calls"] == 4 and "thread" in doc["machine"]  # 256 test images, batches of 64
    acc = {(r["method"], r["T"]): r["accuracy"] for r in doc["rows"]}
    ann = acc[("ann", None)]
    parallel = {T: a for (m, T), a in acc.items() if m == "parallel-ema"}
    learned = {T: a for (m, T), a in acc.items() if m == "parallel-learned"}
    strongest = {T: a for (m, T), a in acc.items() if m == "rate-cw-99.9%"}
    assert sorted(parallel) == sorted(strongest) == [4, 8, 16, 32] and sorted(learned) == [4]
    assert ann > 0.8  # the checkpoint scores 88 % on the full test set
    assert parallel[32] > ann - 0.03
    assert parallel[4] < parallel[32] and strongest[4] < strongest[32]
    # the claim the demo exists to show: parallel conversion needs far fewer steps than IF
    assert parallel[8] > strongest[8]
    # and what learned calibration is for: it recovers accuracy where Algorithm 1 loses most
    assert learned[4] > parallel[4] + 0.02


@pytest.mark.slow  # trains two tiny CNNs twice (about half a minute)
def test_digits_demo_runs_and_a_rerun_gives_the_same_accuracies(tmp_path, capsys):
    """README: `sj-parallel demo --data digits` runs the small demo, and a rerun on the same
    machine gives the same accuracies (every seed and order is fixed)."""
    tables = []
    for run in ("first", "second"):
        out = tmp_path / run
        assert cli.main(["demo", "--data", "digits", "--T", "4", "--no-progress", "--out", str(out)]) == 0
        assert (out / "accuracy_speed.png").stat().st_size > 1000 and (out / "table.md").is_file()
        doc = json.loads((out / "table.json").read_text())
        tables.append({(r["method"], r["T"]): r["accuracy"] for r in doc["rows"]})
    capsys.readouterr()
    first, second = tables
    assert first == second
    # the QCFS network at T = L converts without loss; the ReLU one is calibrated at T = 4
    assert first[("qcfs-parallel", 4)] == first[("qcfs-ann", None)] > 0.9
    assert {("ann", None), ("parallel", 4), ("parallel-count", 4)} <= set(first)
