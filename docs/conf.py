"""Sphinx configuration of the sj-parallel-conversion documentation.

Build (from the repository root, warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # document the checkout even where the package is not installed

import sj_parallel_conversion  # noqa: E402  (a real import: autodoc needs no mocks)

project = "sj-parallel-conversion"
author = "sj-parallel-conversion contributors"
copyright = "2025, sj-parallel-conversion contributors"
release = sj_parallel_conversion.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "results/*.md", "figures/*.py", "*.py"]
templates_path = []
nitpicky = False
pygments_style = "sphinx"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Methods that override SpikingJelly hooks without a docstring of their own would inherit
# SpikingJelly's bilingual docstrings (their "----" transitions are invalid inside a class body).
autodoc_inherit_docstrings = False
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_static_path = []
html_title = f"sj-parallel-conversion {release}"
html_theme_options = {
    "description": "Parallel ANN-SNN conversion for SpikingJelly 2.x",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
