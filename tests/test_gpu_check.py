"""The GPU check script (``tools/gpu_check.sh`` -> ``benchmarks/gpu_check.py``) cannot rot: its
CPU dry run runs every stage on tiny sizes (slow set), and its pieces are checked here too."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_check", None)


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow  # subprocesses, a nested pytest run and three ResNet-20 conversions: about a minute
def test_cpu_dry_run_runs_every_stage_and_writes_both_files(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-dry-run",
                          "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["schema"] == 1 and report["mode"] == "cpu-dry-run" and report["ok"] is True
    st = report["stages"]
    assert set(st) == {"tests", "bitwise", "node", "network"}
    assert st["tests"]["status"] == "passed" and "skipped" in st["tests"]["summary"]
    bit = st["bitwise"]
    assert bit["backend"] == "native" and bit["mismatched_cases"] == 0 and bit["cases"]
    assert {c["layout"] for c in bit["cases"]} == {"contiguous", "channels_last", "sliced"}
    assert any(c["T_in"] != c["T"] for c in bit["cases"])
    assert {c["params"] for c in bit["cases"]} == {"scalar", "per-channel"}
    assert any(s["what"] == "cupy vs torch" and "no CUDA device" in s["reason"] for s in bit["skipped"])
    node = st["node"]
    assert node["status"] == "passed" and node["runs"]
    first = node["runs"][0]
    assert {"if", "pc_torch", "copy"} <= set(first["median_ms"]) and first["effective_GBps"]["if"] > 0
    net = st["network"]
    assert [(r["T"], r["batch"]) for r in net["runs"]] == [(2, 1), (2, 4), (4, 1), (4, 4)]
    for r in net["runs"]:
        assert set(r["ratios"]) == {"if/spike", "if/count", "spike/ann", "count/ann"} and all(
            v > 0 for v in r["ratios"].values())
        assert r["count_vs_spike_max_abs"] < 1e-3
    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("# GPU check", "## CUDA tests", "bit for bit", "## Node vs SpikingJelly IFNode",
                    "## ResNet-20 vs SpikingJelly IF-SNN"):
        assert heading in md


def test_without_cuda_the_gpu_run_refuses_and_names_the_dry_run(gpu_check, capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--cpu-dry-run" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


def test_bit_comparison_counts_signed_zeros_and_keeps_values_in_every_layout(gpu_check):
    assert gpu_check.differing_values(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])) == 1
    assert gpu_check.differing_values(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)) == 0
    x = torch.randn(3, 2, 4, 5, 6)
    for layout in gpu_check.LAYOUTS:
        y = gpu_check.with_layout(x, layout)
        assert torch.equal(y, x)
    assert gpu_check.with_layout(x, "channels_last")[0].is_contiguous(memory_format=torch.channels_last)
    assert not gpu_check.with_layout(x, "sliced")[0].is_contiguous()


def test_markdown_reports_failed_stages(gpu_check):
    report = {"mode": "gpu", "started": "now", "seconds": 1.0, "ok": False,
              "env": {"gpu": "a GPU", "cpu": "x", "threads": 1, "torch": "t", "torch_cuda": "13", "cupy": "c",
                      "spikingjelly": "s", "commit": None},
              "stages": {"tests": {"status": "failed", "command": "pytest", "summary": "1 failed"},
                         "bitwise": {"status": "failed", "backend": "cupy", "cases": [], "skipped": [
                             {"what": "cupy vs torch", "reason": "no cupy"}]},
                         "node": {"status": "failed", "error": "RuntimeError: boom", "runs": []},
                         "network": {"status": "failed", "error": "ValueError: bang", "runs": []}}}
    md = gpu_check.markdown(report)
    assert "# GPU check: a GPU" in md and "**False**" in md and "1 failed" in md and "no cupy" in md
    assert "stage node failed: RuntimeError: boom" in md and "stage network failed: ValueError: bang" in md


def test_shell_entry_point_builds_the_environment_then_runs_the_script():
    script = ROOT / "tools" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/env.sh"' in text and "benchmarks/gpu_check.py" in text


def test_a_stage_that_raises_fails_the_run_and_the_other_stages_still_run(gpu_check, monkeypatch, tmp_path, capsys):
    """benchmarks.rst: exit status 1 when one check fails (a stage that raised), the later stages
    run all the same, and both files say which stage failed and why."""
    ran = []

    def broken(*args):
        raise RuntimeError("boom in bitwise")

    monkeypatch.setattr(gpu_check, "bitwise", broken)
    monkeypatch.setattr(gpu_check, "node_stage",
                        lambda *a: ran.append("node") or {"status": "passed", "if_implementation": None, "runs": []})
    monkeypatch.setattr(gpu_check, "network_stage", lambda *a: ran.append("network") or {"status": "passed", "runs": []})
    assert gpu_check.main(["--cpu-dry-run", "--skip-tests", "--out", str(tmp_path)]) == 1
    capsys.readouterr()
    assert ran == ["node", "network"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and report["stages"]["bitwise"]["status"] == "failed"
    assert "RuntimeError: boom in bitwise" in report["stages"]["bitwise"]["error"]
    assert "stage bitwise failed: RuntimeError: boom in bitwise" in (tmp_path / "gpu_check.md").read_text()
