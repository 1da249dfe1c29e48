"""The data fixtures of tests/conftest.py, as the README describes them: a test that needs the real
CIFAR-10 arrays (``cifar10_dir``) or the public pretrained ResNet files (``pretrained_dir``) skips
with a reason where they are absent, and fails instead under SJPC_REQUIRE_DATA=1, which .ci/run
sets. Run in-process with ``pytester`` on a tiny test file and a copy of conftest.py."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PRETRAINED_FILES = ["resnet32-d509ac18.th", "resnet44-014dd654.th"]

_TINY_TESTS = """
import os
from pathlib import Path

def test_cifar(cifar10_dir):
    assert cifar10_dir == Path(os.environ["SJPC_CIFAR10_DIR"])

def test_pretrained(pretrained_dir):
    assert pretrained_dir == Path(os.environ["SJPC_PRETRAINED_DIR"])
"""


@pytest.fixture
def run_fixtures(pytester, monkeypatch):
    """``run_fixtures(cifar=..., pretrained=..., require=...)`` runs the tiny tests with the copied
    conftest.py; each value None leaves its variable unset."""
    shutil.copy(TESTS / "conftest.py", pytester.path / "conftest.py")
    shutil.copy(TESTS / "pretrained_resnets.py", pytester.path / "pretrained_resnets.py")
    pytester.makepyfile(test_tiny=_TINY_TESTS)

    def run(cifar=None, pretrained=None, require=None):
        for name, value in (("SJPC_CIFAR10_DIR", cifar), ("SJPC_PRETRAINED_DIR", pretrained),
                            ("SJPC_REQUIRE_DATA", require)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
        # Without the hypothesis plugin: its hooks took 1.3-2.5 s of every in-process run here
        # (2 cores), and these tests need nothing from it.
        return pytester.runpytest_inprocess("-rsE", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    return run


def _folder(path: Path, files) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for f in files:
        (path / f).write_bytes(b"")
    return path


def test_unset_variables_skip_with_the_reason(run_fixtures):
    result = run_fixtures()
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["SKIPPED *SJPC_CIFAR10_DIR is not set",
                                 "SKIPPED *SJPC_PRETRAINED_DIR is not set"], consecutive=False)


def test_folders_without_the_files_skip_naming_the_folder(run_fixtures, tmp_path):
    # One of the two files in each folder: still absent.
    cifar = _folder(tmp_path / "cifar", ["train.npz"])
    pretrained = _folder(tmp_path / "resnets", PRETRAINED_FILES[:1])
    result = run_fixtures(cifar=cifar, pretrained=pretrained)
    result.assert_outcomes(skipped=2)
    out = result.stdout.str()
    assert f"CIFAR-10 npz files not found in {str(cifar)!r} (set SJPC_CIFAR10_DIR)" in out, out
    assert f"not found in {str(pretrained)!r} (set SJPC_PRETRAINED_DIR)" in out, out


@pytest.mark.parametrize("present", [False, True], ids=["unset", "empty-folders"])
def test_require_data_fails_instead_of_skipping(run_fixtures, tmp_path, present):
    if present:
        cifar, pretrained = _folder(tmp_path / "cifar", []), _folder(tmp_path / "resnets", [])
        msgs = [f"*Failed: CIFAR-10 npz files not found in {str(cifar)!r}*",
                f"*Failed: pretrained ResNet files * not found in {str(pretrained)!r}*"]
    else:
        cifar = pretrained = None
        msgs = ["*Failed: SJPC_CIFAR10_DIR is not set*", "*Failed: SJPC_PRETRAINED_DIR is not set*"]
    result = run_fixtures(cifar=cifar, pretrained=pretrained, require="1")
    # pytest.fail in a fixture is reported as an error at the test's setup: the run fails.
    result.assert_outcomes(errors=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(msgs, consecutive=False)


@pytest.mark.parametrize("require", [None, "1"], ids=["default", "require"])
def test_present_files_are_used(run_fixtures, tmp_path, require):
    """The fixtures return the folders where the files are there (whatever SJPC_REQUIRE_DATA says),
    so the skips above come from the missing files and not from anything else."""
    cifar = _folder(tmp_path / "cifar", ["train.npz", "test.npz"])
    pretrained = _folder(tmp_path / "resnets", PRETRAINED_FILES)
    result = run_fixtures(cifar=cifar, pretrained=pretrained, require=require)
    result.assert_outcomes(passed=2)


def _run_ci(tmp_path: Path, data_files) -> tuple[subprocess.CompletedProcess, Path]:
    """A copy of .ci/run whose tools/test.sh records the variables and arguments it was given."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / "tools").mkdir()
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    record = tmp_path / "record"
    (repo / "tools" / "test.sh").write_text(
        f'printf "%s\\n" "$SJPC_REQUIRE_DATA" "$SJPC_CIFAR10_DIR" "$@" > "{record}"\n')
    data = _folder(tmp_path / "shared" / "data" / "cifar10", data_files)
    env = {k: v for k, v in os.environ.items() if k not in ("SJPC_CIFAR10_DIR", "SJPC_REQUIRE_DATA")}
    run = subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    return run, record


def test_ci_run_sets_require_data_and_runs_every_test(tmp_path):
    run, record = _run_ci(tmp_path, ["train.npz", "test.npz"])
    assert run.returncode == 0, run.stderr
    require, data, *args = record.read_text().splitlines()
    assert require == "1"
    assert Path(data).resolve() == (tmp_path / "shared" / "data" / "cifar10").resolve()
    assert args == ["-m", "slow or not slow"]


def test_ci_run_stops_where_the_data_is_missing(tmp_path):
    run, record = _run_ci(tmp_path, ["train.npz"])
    assert run.returncode == 1 and not record.exists()
    assert "CI: missing" in run.stderr and "test.npz" in run.stderr, run.stderr
