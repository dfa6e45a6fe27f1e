"""Recipes: YAML -> typed, validated, frozen configuration."""

from llmtune.recipe.load import dump_recipe, load_recipe, validate_recipe
from llmtune.recipe.schema import Recipe

__all__ = ["Recipe", "dump_recipe", "load_recipe", "validate_recipe"]
