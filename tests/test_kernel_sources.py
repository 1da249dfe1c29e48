"""The kernel sources are files of the package (``kernels/csrc``), shipped as package data, read
through importlib.resources and hashed into the kernel cache's key."""
from __future__ import annotations

import configparser
import fnmatch
import importlib.resources
import re
from pathlib import Path

import pytest
import torch

import sj_parallel_conversion
from sj_parallel_conversion.kernels import cupy_backend, native_backend, sources

PACKAGE = Path(sj_parallel_conversion.__file__).parent
ROOT = PACKAGE.parent
CSRC = PACKAGE / "kernels" / sources.FOLDER


def test_every_kernel_source_is_a_file_read_through_importlib_resources():
    names = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    assert names == sorted([native_backend.SOURCE, cupy_backend.SOURCE])
    folder = importlib.resources.files("sj_parallel_conversion.kernels").joinpath(sources.FOLDER)
    for name in names:
        text = folder.joinpath(name).read_text(encoding="utf-8")
        assert text == (CSRC / name).read_text(encoding="utf-8") == sources.read(name)
    assert "int sjpc_native_fire_##SUFFIX(" in sources.read(native_backend.SOURCE)
    assert cupy_backend.source() == sources.read(cupy_backend.SOURCE)
    assert set(re.findall(r"__global__ void (\w+)\(", cupy_backend.source())) == set(
        cupy_backend._KERNEL_NAMES.values())


def test_package_data_ships_every_kernel_source():
    """setup.cfg's package_data patterns match every file in csrc, so a wheel or an installed
    package holds them (importlib.resources then finds them there)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["sj_parallel_conversion"].replace("\n", ",").split(",")
                if p.strip()]
    for path in CSRC.iterdir():
        if path.suffix in (".cpp", ".cu"):
            rel = path.relative_to(PACKAGE).as_posix()
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)


def test_no_kernel_source_is_left_in_python_strings():
    for path in (PACKAGE / "kernels").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "#include <" not in text and "__global__" not in text and 'extern "C"' not in text, path.name


def test_the_cache_key_follows_the_source_text(monkeypatch, tmp_path):
    """A changed source builds a new library (under another name) instead of loading the one
    built from the old text; the same text reuses it."""
    if native_backend.compiler() is None:
        pytest.skip("no C++ compiler to build the native kernel")
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))
    original = sources.read(native_backend.SOURCE)

    def libraries():
        return sorted(p.name for p in tmp_path.glob("*.so"))

    try:
        native_backend._load.cache_clear()
        assert native_backend.availability() is None
        first = libraries()
        native_backend._load.cache_clear()
        assert native_backend.availability() is None and libraries() == first  # reused
        monkeypatch.setattr(sources, "read", lambda name: original + "\n// another version\n")
        native_backend._load.cache_clear()
        assert native_backend.availability() is None
        second = libraries()
        assert len(first) == 1 and len(second) == 2 and first[0] in second
        p = [torch.tensor(v) for v in (1.0, 0.5, 0.0, 1.0)]
        x = torch.randn(3, 2, 5)
        assert torch.equal(native_backend.fire(x, 4, p, 1, True), native_backend.torch_backend.fire(x, 4, p, 1, True))
    finally:
        native_backend._load.cache_clear()
        native_backend.count_available.cache_clear()
