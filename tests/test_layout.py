"""The library apart from its tools: importing the package, or asking the command line for help,
loads no tool it does not need (no matplotlib, torchvision, scikit-learn, no CLI module), and no
library module imports from ``sj_parallel_conversion.tools``. Checked by the modules a fresh
interpreter holds, not by timing (the times are in docs/benchmarks.rst)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sj_parallel_conversion

PACKAGE = Path(sj_parallel_conversion.__file__).resolve().parent
HEAVY = ("matplotlib", "torchvision", "sklearn", "tabulate")


def _loaded_after(code: str) -> list:
    """Module names a fresh interpreter holds after running ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _unwanted(modules: list, allowed_tools: tuple = ()) -> list:
    return [m for m in modules if m.split(".")[0] in HEAVY or
            (m.startswith("sj_parallel_conversion.tools") and m not in allowed_tools)]


def test_importing_the_package_loads_no_tool():
    loaded = _loaded_after("import sj_parallel_conversion")
    assert "sj_parallel_conversion.recipe" in loaded  # the library itself is imported
    assert _unwanted(loaded) == []


def test_help_loads_neither_torchvision_nor_matplotlib():
    code = ("import sys\nfrom sj_parallel_conversion.tools.cli import main\nsys.argv = ['sj-parallel', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n")
    loaded = _loaded_after(code)
    assert [m for m in loaded if m.split(".")[0] in ("matplotlib", "torchvision", "sklearn")] == []


def test_tool_names_of_the_package_load_on_first_use():
    loaded = _loaded_after("import sj_parallel_conversion as s\nassert callable(s.load_user_model)\n"
                           "assert all(hasattr(s, n) for n in s.__all__)")
    assert "sj_parallel_conversion.tools.models.user" in loaded
    assert "load_user_model" in dir(sj_parallel_conversion)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sj_parallel_conversion.nope


def _imported_modules(path: Path) -> set:
    """Absolute names of the package modules ``path`` imports (relative imports resolved)."""
    package = ["sj_parallel_conversion", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("sj_parallel_conversion")}


def test_no_library_module_imports_a_tool():
    # __main__ is ``python -m sj_parallel_conversion``: the command line, run only when asked for.
    library = [p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts
               and p.name != "__main__.py"]
    assert len(library) > 20
    offending = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported_modules(p)
                                                     if n.startswith("sj_parallel_conversion.tools"))
                 for p in library}
    assert {k: v for k, v in offending.items() if v} == {}
