"""Shared fixtures. Tests that need the real CIFAR-10 files skip with a reason where they are
absent (a user's clone) and fail where SJPC_REQUIRE_DATA=1, for runs that must not skip them."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Threads for the slow tests (real data, ResNet-20 conversions): OMP_NUM_THREADS, at most 2.
_SLOW_THREADS = max(1, min(2, torch.get_num_threads()))


def pytest_runtest_setup(item):
    """One intra-op thread for the fast tests: their tensors are tiny, so a second thread only adds
    synchronisation, and on a shared machine the threads wait for each other (a learned
    calibration of a small CNN took 0.8 s with one thread and 16 s with two at load 6 on 2 cores).
    Set before the test's fixtures, so module-scoped conversions run with the same count."""
    torch.set_num_threads(_SLOW_THREADS if item.get_closest_marker("slow") else 1)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    # tools/env.sh (sourced by tools/test.sh, which .ci/run calls) names the folder; nothing is guessed here.
    env = os.environ.get("SJPC_CIFAR10_DIR")
    d = Path(env) if env else None
    if d is None or not ((d / "train.npz").is_file() and (d / "test.npz").is_file()):
        msg = ("SJPC_CIFAR10_DIR is not set" if d is None
               else f"CIFAR-10 npz files not found in {str(d)!r} (set SJPC_CIFAR10_DIR)")
        if os.environ.get("SJPC_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def pretrained_dir() -> Path:
    """The public pretrained ResNet-32/44 files (``SJPC_PRETRAINED_DIR``, set by tools/env.sh):
    skipped where absent, a failure where SJPC_REQUIRE_DATA=1, as for CIFAR-10."""
    from pretrained_resnets import ENV_VAR, FILES

    env = os.environ.get(ENV_VAR)
    d = Path(env) if env else None
    if d is None or not all((d / f).is_file() for f, _ in FILES.values()):
        msg = (f"{ENV_VAR} is not set" if d is None
               else f"pretrained ResNet files {[f for f, _ in FILES.values()]} not found in {str(d)!r} (set {ENV_VAR})")
        if os.environ.get("SJPC_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def load_example():
    """``load_example("train_cifar")`` imports ``examples/train_cifar.py`` as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "examples" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
