"""The kernel sources, shipped as package data in ``kernels/csrc`` (C++ and CUDA files that C++
tooling and readers find as such). Their text is what the kernel caches hash: a changed file
builds a new library."""
from __future__ import annotations

import functools
from importlib import resources

#: The folder of the sources, relative to this package.
FOLDER = "csrc"


@functools.lru_cache(maxsize=None)
def read(name: str) -> str:
    """The text of ``csrc/<name>``, read through :mod:`importlib.resources` (so an installed
    package, wheel or zip, finds it as a source checkout does)."""
    return resources.files(__package__).joinpath(FOLDER).joinpath(name).read_text(encoding="utf-8")
