"""tools/env.sh and tools/run.sh, as the README describes them: where the disk is short of space
env.sh warns before installing, and a failed install stops the command with the free space named,
instead of going on with a half-built environment; it points SJPC_CIFAR10_DIR and
SJPC_PRETRAINED_DIR at the shared data folders next to the clone when they are unset and keeps a
value the user set; ``bash tools/run.sh`` runs ``sj-parallel demo`` and ``bash tools/run.sh ARGS``
runs ``sj-parallel ARGS`` inside the environment. Run on copies of the scripts with a stand-in
``df`` and a stand-in ``.venv`` whose python plays pip (or records the command it was given)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, free_mib: int, pip_status: int, env_vars: dict | None = None,
         then: str = "echo sourced") -> subprocess.CompletedProcess:
    """Source a copy of env.sh (``then`` runs after it in the same shell). ``env_vars``: variables to
    set (a value of None unsets the variable)."""
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
    for name, value in (env_vars or {}).items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return subprocess.run(["bash", "-c", f"source {repo}/tools/env.sh && {then}"], env=env,
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


_DATA_VARS = ("SJPC_CIFAR10_DIR", "SJPC_PRETRAINED_DIR")
_PRINT_DATA_VARS = 'printf "%s\\n" "$SJPC_CIFAR10_DIR" "$SJPC_PRETRAINED_DIR"'


def test_env_points_unset_data_variables_at_the_shared_folders(tmp_path):
    run = _run(tmp_path, 50_000, pip_status=0, env_vars={v: None for v in _DATA_VARS}, then=_PRINT_DATA_VARS)
    assert run.returncode == 0, run.stderr
    cifar, pretrained = run.stdout.splitlines()
    repo = tmp_path / "repo"
    # README: `../shared/data/cifar10` next to the clone (and the pretrained folder beside it).
    assert cifar == f"{repo}/../shared/data/cifar10"
    assert pretrained == f"{repo}/../shared/data/pretrained_cifar10_resnets"
    assert Path(cifar).resolve() == (tmp_path / "shared" / "data" / "cifar10").resolve()


@pytest.mark.parametrize("empty", [False, True], ids=["set", "set-empty"])
def test_env_keeps_data_variables_the_user_set(tmp_path, empty):
    mine = {"SJPC_CIFAR10_DIR": str(tmp_path / "my cifar"), "SJPC_PRETRAINED_DIR": str(tmp_path / "my resnets")}
    if empty:  # an empty value counts as unset (`${VAR:-default}`), so the defaults apply
        mine = {v: "" for v in _DATA_VARS}
    run = _run(tmp_path, 50_000, pip_status=0, env_vars=mine, then=_PRINT_DATA_VARS)
    assert run.returncode == 0, run.stderr
    got = run.stdout.splitlines()
    if empty:
        assert got == [f"{tmp_path / 'repo'}/../shared/data/cifar10",
                       f"{tmp_path / 'repo'}/../shared/data/pretrained_cifar10_resnets"]
    else:
        assert got == [mine["SJPC_CIFAR10_DIR"], mine["SJPC_PRETRAINED_DIR"]]


def _run_sh(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``bash tools/run.sh ARGS`` on a copy of the repository scripts whose (already installed)
    ``.venv`` holds a stand-in python, python3 and sj-parallel that record their argv, one per
    line, and the directory they ran in. Returns the run and the recorded command, ``python -m
    sj_parallel_conversion X`` written as ``sj-parallel X`` (the same entry point)."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    for name in ("env.sh", "run.sh"):
        shutil.copy(ROOT / "tools" / name, repo / "tools" / name)
    venv = repo / ".venv"
    venv_bin = venv / "bin"
    venv_bin.mkdir(parents=True)
    (venv / ".sjpc-installed").touch()  # installed already: env.sh must not call pip
    record = tmp_path / "argv"
    for name in ("python", "python3", "sj-parallel"):  # any of them: never the real command
        (venv_bin / name).write_text(f'#!/bin/sh\n{{ pwd; echo {name}; for a in "$@"; do echo "$a"; done; }} > "{record}"\n')
        (venv_bin / name).chmod(0o755)
    # What activating the environment does that matters here: its bin first on PATH.
    (venv_bin / "activate").write_text(f'export VIRTUAL_ENV="{venv}"\nexport PATH="{venv_bin}:$PATH"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(["bash", str(repo / "tools" / "run.sh"), *args], cwd=elsewhere,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    cwd, *argv = record.read_text().split("\n")[:-1]
    assert Path(cwd).resolve() == repo.resolve()  # env.sh moves to the repository root
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "sj_parallel_conversion"]:
        argv = ["sj-parallel", *argv[3:]]
    return run, argv


def test_run_sh_without_arguments_runs_the_demo(tmp_path):
    run, argv = _run_sh(tmp_path)
    assert argv == ["sj-parallel", "demo"], argv


@pytest.mark.parametrize("args", [["compare", "--T", "4"], ["compare", "--plot", "runs/a b.png", "--T", "4", "8"]],
                         ids=["compare-T4", "argument-with-space"])
def test_run_sh_passes_its_arguments_to_sj_parallel(tmp_path, args):
    run, argv = _run_sh(tmp_path, *args)
    assert argv == ["sj-parallel", *args], argv


def test_python_m_package_is_the_sj_parallel_entry_point():
    """run.sh calls ``python -m sj_parallel_conversion``; that is the ``sj-parallel`` command."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    target = {k.strip(): v.strip() for k, v in scripts.items()}["sj-parallel"]
    main = (ROOT / "sj_parallel_conversion" / "__main__.py").read_text()
    module, func = target.split(":")
    assert module == "sj_parallel_conversion.tools.cli" and f"from .tools.cli import {func}" in main
    assert f"sys.exit({func}())" in main
