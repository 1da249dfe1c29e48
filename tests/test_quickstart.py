"""docs/quickstart.rst runs as written: its ``.. code-block:: python`` blocks, in order, as one
script from the repository root (shipped checkpoints and CIFAR-10 subset only)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.rst"


def python_blocks(rst: str) -> list:
    """The bodies of the ``.. code-block:: python`` directives, dedented, in document order."""
    blocks = []
    lines = rst.splitlines()
    i = 0
    while i < len(lines):
        if re.match(r"^\s*\.\. code-block:: python\s*$", lines[i]):
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
        else:
            i += 1
    return blocks


def test_python_blocks_are_found():
    blocks = python_blocks(QUICKSTART.read_text())
    assert len(blocks) >= 4
    assert all(b and not b.startswith((" ", "\t")) for b in blocks)
    # a later block uses names the first one defines: they are one script, not independent snippets
    assert "load_checkpoint" in blocks[0] and "count_inference" in blocks[-1]


@pytest.mark.slow  # converts a ResNet-20 five times (about a minute on one core)
def test_quickstart_runs_as_one_script(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(python_blocks(QUICKSTART.read_text())) + "\n")
    env = dict(os.environ)
    env.pop("SJPC_CIFAR10_DIR", None)  # shipped data only
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    # what the prose around the blocks claims
    assert "predictions that differ from the ANN: 0 of 200" in out
    assert "same predictions: True" in out
    ann, snn = (float(v) for v in re.search(r"ANN ([\d.]+) %, parallel SNN at T=16 ([\d.]+) %", out).groups())
    assert snn > ann - 4.0, out
    accs = {int(t): float(a) for t, a in re.findall(r"^T=(\d+): ([\d.]+) %$", out, flags=re.M)}
    assert set(accs) == {4, 8, 32} and accs[32] > accs[4], out


@pytest.mark.slow  # a fresh interpreter converts the shipped ResNet-20
def test_readme_python_snippet_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "readme.py"
    script.write_text(blocks[0])
    env = dict(os.environ)
    env.pop("SJPC_CIFAR10_DIR", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    spike_acc, count_acc = (float(v) for v in res.stdout.split()[-2:])
    assert spike_acc == count_acc and spike_acc > 0.7, res.stdout
