"""Names for recipes and neurons, so tools can ask for ``"parallel"`` instead of importing classes.

Built-in entries are registered on import; third-party packages add theirs through the entry-point
groups ``sj_parallel_conversion.recipes`` and ``sj_parallel_conversion.neurons`` (this package
advertises its own there too), or at run time with :func:`register_recipe` /
:func:`register_neuron`.
"""
from __future__ import annotations

from importlib import metadata
from typing import Callable, Dict

RECIPE_GROUP = "sj_parallel_conversion.recipes"
NEURON_GROUP = "sj_parallel_conversion.neurons"

_RECIPES: Dict[str, Callable] = {}
_NEURONS: Dict[str, Callable] = {}
_loaded_entry_points = False

__all__ = ["register_recipe", "register_neuron", "get_recipe", "get_neuron", "available_recipes",
           "available_neurons"]


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"registry names must be non-empty strings, got {name!r}")
    return name


def register_recipe(name: str, factory: Callable, overwrite: bool = False) -> None:
    """Register ``factory(**options) -> FXConversionRecipe`` under ``name``."""
    if _check_name(name) in _RECIPES and not overwrite and _RECIPES[name] is not factory:
        raise ValueError(f"a recipe named {name!r} is already registered (pass overwrite=True)")
    _RECIPES[name] = factory


def register_neuron(name: str, factory: Callable, overwrite: bool = False) -> None:
    """Register a neuron class or factory under ``name``."""
    if _check_name(name) in _NEURONS and not overwrite and _NEURONS[name] is not factory:
        raise ValueError(f"a neuron named {name!r} is already registered (pass overwrite=True)")
    _NEURONS[name] = factory


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for group, table in ((RECIPE_GROUP, _RECIPES), (NEURON_GROUP, _NEURONS)):
        for ep in metadata.entry_points(group=group):
            if ep.name not in table:
                try:
                    table[ep.name] = ep.load()
                except Exception as exc:  # a broken third-party plugin must not break ours
                    import warnings
                    warnings.warn(f"could not load {group} entry point {ep.name!r}: {exc}", RuntimeWarning)


def available_recipes() -> list:
    """Registered recipe names."""
    _load_entry_points()
    return sorted(_RECIPES)


def available_neurons() -> list:
    """Registered neuron names."""
    _load_entry_points()
    return sorted(_NEURONS)


def get_recipe(name: str, **options):
    """Build the recipe registered as ``name`` with ``options``."""
    _load_entry_points()
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; registered recipes: {', '.join(available_recipes())}")
    return _RECIPES[name](**options)


def get_neuron(name: str) -> Callable:
    """The neuron class or factory registered as ``name``."""
    _load_entry_points()
    if name not in _NEURONS:
        raise ValueError(f"unknown neuron {name!r}; registered neurons: {', '.join(available_neurons())}")
    return _NEURONS[name]
