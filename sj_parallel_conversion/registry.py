"""Recipe names, so tools can ask for ``"parallel"`` instead of importing classes.

Built-in recipes are registered on import; third-party packages add theirs through the entry-point
group ``sj_parallel_conversion.recipes`` (this package advertises its own there too), or at run
time with :func:`register_recipe`.
"""
from __future__ import annotations

from importlib import metadata
from typing import Callable, Dict

RECIPE_GROUP = "sj_parallel_conversion.recipes"

_RECIPES: Dict[str, Callable] = {}
_loaded_entry_points = False

__all__ = ["register_recipe", "get_recipe", "available_recipes"]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"registry names must be non-empty strings, got {name!r}")
    return name


def register_recipe(name: str, factory: Callable, overwrite: bool = False) -> None:
    """Register ``factory(**options) -> FXConversionRecipe`` under ``name``."""
    if _check_name(name) in _RECIPES and not overwrite and _RECIPES[name] is not factory:
        raise ValueError(f"a recipe named {name!r} is already registered (pass overwrite=True)")
    _RECIPES[name] = factory


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in metadata.entry_points(group=RECIPE_GROUP):
        if ep.name not in _RECIPES:
            try:
                _RECIPES[ep.name] = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break ours
                import warnings
                warnings.warn(f"could not load {RECIPE_GROUP} entry point {ep.name!r}: {exc}", RuntimeWarning)


def available_recipes() -> list:
    """Registered recipe names."""
    _load_entry_points()
    return sorted(_RECIPES)


def get_recipe(name: str, **options):
    """Build the recipe registered as ``name`` with ``options``."""
    _load_entry_points()
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; registered recipes: {', '.join(available_recipes())}")
    return _RECIPES[name](**options)
