"""Recipes: YAML -> typed, validated, frozen configuration.

The names below are imported on first use: the schema is assembled from the method modules
(llmtune/methods/), which import `llmtune.recipe.section` while it is being built.
"""

import importlib

_EXPORTS = {
    "Recipe": "llmtune.recipe.schema",
    "dump_recipe": "llmtune.recipe.load",
    "load_recipe": "llmtune.recipe.load",
    "validate_recipe": "llmtune.recipe.load",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
