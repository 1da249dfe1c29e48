"""tools/env.sh, as the README describes it: where the disk is short of space it warns before
installing, and a failed install stops the command with the free space named, instead of
going on with a half-built environment. Run on a copy of the script with a stand-in ``df`` and
a stand-in ``.venv`` whose python plays pip."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, free_mib: int, pip_status: int) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "env.sh", repo / "tools" / "env.sh")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    # The stand-in python records that pip ran and answers with the status it was given.
    (venv_bin / "python").write_text(f"#!/bin/sh\necho \"$@\" > \"{tmp_path}/pip-args\"\nexit {pip_status}\n")
    (venv_bin / "activate").write_text("")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "df").write_text("#!/bin/sh\necho 'Filesystem 1048576-blocks Used Available Capacity Mounted on'\n"
                             f"echo '/dev/x 100000 90000 {free_mib} 99% /'\n")
    for f in (venv_bin / "python", fake / "df"):
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", f"source {repo}/tools/env.sh && echo sourced"], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("free_mib, warned", [(300, True), (7_167, True), (7_168, False), (50_000, False)])
def test_env_warns_before_installing_where_the_disk_is_short(tmp_path, free_mib, warned):
    run = _run(tmp_path, free_mib, pip_status=0)
    assert run.returncode == 0 and "sourced" in run.stdout, run.stderr
    assert "pip install" in (tmp_path / "pip-args").read_text()
    assert (f"warning: {free_mib} MiB free" in run.stderr) is warned, run.stderr
    assert (tmp_path / "repo" / ".venv" / ".sjpc-installed").exists()


def test_env_stops_when_the_install_fails_and_names_the_free_space(tmp_path):
    run = _run(tmp_path, 300, pip_status=1)
    assert run.returncode == 1 and "sourced" not in run.stdout
    assert "failed (300 MiB free now)" in run.stderr, run.stderr
    # Not marked installed, so the next run installs again.
    assert not (tmp_path / "repo" / ".venv" / ".sjpc-installed").exists()
