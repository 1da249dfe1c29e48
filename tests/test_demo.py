"""The main job: ``sj-parallel demo`` on the shipped ResNet-20 and CIFAR-10 subset, from anywhere."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sj_parallel_conversion import cli
from sj_parallel_conversion.demo import CIFAR_CHECKPOINT, run_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(data="mnist"), "data must be one of"),
    (dict(test_images=1001), "test_images must be an integer in 1..1000"),
    (dict(calib_images=0), "calib_images must be an integer in 2..1024"),
    (dict(baselines=("rate-cw",)), "unknown baselines"),
    (dict(T_list=[4, 0]), "T_list must hold integers >= 1"),
    (dict(learned_T=[2]), r"learned_T \[2\] not among the T"),
])
def test_run_demo_rejects_bad_arguments_before_any_work(kwargs, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        run_demo(out_dir=str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_demo_rejects_more_images_than_shipped(capsys):
    assert cli.main(["demo", "--images", "5000"]) == 2
    assert "shipped CIFAR-10 subset holds 1000 test images" in capsys.readouterr().err


def test_the_demo_checkpoint_ships_with_the_package():
    assert CIFAR_CHECKPOINT.is_file() and CIFAR_CHECKPOINT.parent.parent == Path(cli.__file__).parent


@pytest.mark.slow  # converts ResNet-20 four times and runs an IF network for 32 steps (1-2 minutes)
def test_demo_runs_from_an_empty_folder_without_the_dataset(tmp_path):
    env = dict(os.environ)
    env.pop("SJPC_CIFAR10_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    res = subprocess.run([sys.executable, "-m", "sj_parallel_conversion", "demo", "--no-progress"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SJ RateCodingRecipe 99.9%, channel-wise, half threshold (IF)" in res.stdout
    out = tmp_path / "runs" / "demo"
    assert (out / "accuracy_speed.png").stat().st_size > 1000 and (out / "table.md").is_file()
    rows = json.loads((out / "table.json").read_text())["rows"]
    acc = {(r["method"], r["T"]): r["accuracy"] for r in rows}
    ann = acc[("ann", None)]
    parallel = {T: a for (m, T), a in acc.items() if m.startswith("parallel")}
    strongest = {T: a for (m, T), a in acc.items() if m == "rate-cw-99.9%"}
    assert sorted(parallel) == sorted(strongest) == [4, 8, 16, 32]
    assert ann > 0.8  # the checkpoint scores 88 % on the full test set
    assert parallel[32] > ann - 0.03
    assert parallel[4] < parallel[32] and strongest[4] < strongest[32]
    # the claim the demo exists to show: parallel conversion needs far fewer steps than IF
    assert parallel[8] > strongest[8]
