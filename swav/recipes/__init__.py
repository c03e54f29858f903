"""Recipes shipped with the package: YAML files holding partial configs (SPEC §9 and small-data jobs).

Each ``<name>.yaml`` lists only the keys that differ from the defaults of :class:`swav.config.Config`
(the original script's defaults). ``swav pretrain --recipe NAME`` starts from one.

Example:
    >>> "swav_800ep" in available_recipes()
    True
    >>> load_recipe("swav_200ep_bs256").swav.queue_length
    3840
"""
from __future__ import annotations

import difflib
from importlib import resources
from typing import Any


from swav.config import Config, load_yaml_text, merge_dict

__all__ = ["available_recipes", "recipe_text", "recipe_dict", "load_recipe"]


def available_recipes() -> list[str]:
    """Sorted recipe names (file names without ``.yaml``)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def recipe_text(name: str) -> str:
    """The YAML text of a recipe; ValueError with close matches for an unknown name."""
    names = available_recipes()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown recipe {name!r}.{hint} Available recipes: {', '.join(names)}")
    return resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def recipe_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a recipe (sections -> keys -> values)."""
    raw = load_yaml_text(recipe_text(name)) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {name!r} must hold a mapping of sections")
    return raw


def load_recipe(name: str, base: Config | None = None) -> Config:
    """A validated :class:`Config`: the defaults (or ``base``) with the recipe applied."""
    return merge_dict(base or Config(), recipe_dict(name), source=f"recipe {name}")
