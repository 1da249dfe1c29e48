"""The kernel sources are files of the package (``kernels/csrc``), shipped as package data, read
through importlib.resources and hashed into the kernel cache's key."""
from __future__ import annotations

import configparser
import fnmatch
import importlib.resources
import re
import shlex
import shutil
import subprocess
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


# -- the rest of the cache key (compiler, flags, platform) and the compile command -----------------
def _spy_compiles(monkeypatch, compile):
    """Record every command the native build runs; ``compile(argv)`` then stands in for it
    (``None``: run it for real)."""
    commands = []
    real_run = native_backend.subprocess.run

    def run(argv, *args, **kwargs):
        commands.append(list(argv))
        return real_run(argv, *args, **kwargs) if compile is None else compile(argv)

    monkeypatch.setattr(native_backend.subprocess, "run", run)
    return commands


def _no_march(argv):
    """No flag that picks the build machine's instruction set (-march, or -mcpu on ARM)."""
    return not any(a.startswith(("-march", "-mcpu")) for a in argv)


def test_the_compile_command_splits_cxx_and_has_no_march(monkeypatch, tmp_path):
    """``$CXX`` may hold a command with arguments ("env g++", "ccache g++"): it is split into
    words ahead of the flags, and the command never holds ``-march``. No compiler runs: the
    build is stopped where the command is handed to ``subprocess.run``."""
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))
    commands = _spy_compiles(monkeypatch, lambda argv: subprocess.CompletedProcess(argv, 1, "", "stopped"))
    assert _no_march(native_backend.FLAGS)
    try:
        for cxx in ("g++", "env g++", "ccache g++ -DSJPC_SOMETHING=1"):
            monkeypatch.setenv("CXX", cxx)
            native_backend._load.cache_clear()
            assert "failed to build" in native_backend.availability()
            argv = commands[-1]
            words = shlex.split(cxx)
            assert argv[:len(words)] == words, (cxx, argv)
            assert argv[len(words):len(words) + len(native_backend.FLAGS)] == list(native_backend.FLAGS)
            assert argv[-3].endswith(native_backend.SOURCE) and _no_march(argv), argv
        assert len(commands) == 3
    finally:
        native_backend._load.cache_clear()
        native_backend.count_available.cache_clear()


def test_the_cache_key_follows_the_compiler_flags_and_platform(monkeypatch, tmp_path):
    """Another compiler command, other flags or another platform give the library another name;
    the same ones reuse it without compiling. The compiler is a stand-in writing a file (the
    names do not depend on what is compiled; the slow test below builds real libraries)."""
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))

    def fake_compile(argv):
        Path(argv[argv.index("-o") + 1]).write_bytes(b"not a library: " + " ".join(argv).encode())
        return subprocess.CompletedProcess(argv, 0, "", "")

    commands = _spy_compiles(monkeypatch, fake_compile)
    files = {native_backend.SOURCE: sources.read(native_backend.SOURCE)}
    flags = native_backend.FLAGS
    other_flags = tuple("-O2" if f == "-O3" else f for f in flags)
    assert other_flags != flags

    def name(cxx, flags):
        return native_backend.build_library("sjpc_native_fire", files, native_backend.SOURCE, flags, cxx).name

    first = name("g++", flags)
    names = {first, name("env g++", flags), name("g++", other_flags), name("g++", (*flags, "-DSJPC_X=1"))}
    monkeypatch.setattr(native_backend.platform, "machine", lambda: "another-machine")
    names.add(name("g++", flags))
    assert len(names) == 5 and len(commands) == 5
    monkeypatch.undo()
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))
    commands = _spy_compiles(monkeypatch, fake_compile)
    assert name("g++", flags) == first and commands == []  # the same key: reused, nothing compiled
    assert sorted(p.name for p in tmp_path.glob("*.so")) == sorted(names)


@pytest.mark.slow
def test_another_compiler_or_flags_build_a_working_kernel(monkeypatch, tmp_path):
    """The real kernel built with the default compiler, with it run through ``env`` (a ``$CXX``
    holding arguments) and with other flags: three libraries under three names, each computing
    the torch reference's bits, none compiled with ``-march``; the first settings then reuse the
    first library."""
    base = native_backend.compiler()
    if base is None:
        pytest.skip("no C++ compiler to build the native kernel")
    if shutil.which("env") is None:
        pytest.skip("no env command to run the compiler through")
    monkeypatch.setenv("SJPC_CACHE_DIR", str(tmp_path))
    commands = _spy_compiles(monkeypatch, None)
    flags = native_backend.FLAGS
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, 7, generator=g)
    p = [torch.rand(4, generator=g) + 0.5, torch.full((4,), 0.25), torch.zeros(4), torch.full((4,), 1.5)]
    expected = native_backend.torch_backend.fire(x, 6, p, 1, True)
    seen = []

    def build(cxx, flags):
        monkeypatch.setenv("CXX", cxx)
        monkeypatch.setattr(native_backend, "FLAGS", flags)
        native_backend._load.cache_clear()
        assert native_backend.availability() is None, (cxx, flags, native_backend.availability())
        assert torch.equal(native_backend.fire(x, 6, p, 1, True), expected), (cxx, flags)
        libraries = sorted(p.name for p in tmp_path.glob("*.so"))
        new = sorted(set(libraries) - set(seen))
        seen[:] = libraries
        return new

    try:
        first = build(base, flags)
        assert len(first) == 1 and len(commands) == 1
        assert len(build(f"env {shlex.quote(base)}", flags)) == 1 and commands[-1][:2] == ["env", base]
        assert len(build(base, tuple("-O2" if f == "-O3" else f for f in flags))) == 1
        assert "-O2" in commands[-1] and "-O3" not in commands[-1]
        assert len(commands) == 3 and all(_no_march(c) for c in commands), commands
        assert build(base, flags) == [] and len(commands) == 3  # the first settings: reused
    finally:
        native_backend._load.cache_clear()
        native_backend.count_available.cache_clear()
