"""Recipes: TOML files that name components and their options (see ``load_recipe``)."""

from mllmkit.recipe.resolve import Component, Recipe, load_recipe

__all__ = ["Component", "Recipe", "load_recipe"]
