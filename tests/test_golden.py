"""A golden-loss tripwire, as torchtune keeps: the first losses of a tiny SFT run, pinned.

The equality tests (resume == uninterrupted, accumulation == larger batch, our CPU loss == TRL's)
compare two arms of llmtune with each other, so a change that shifts both (a different label mask,
a lost end-of-turn token, a new default learning rate, another shuffle, a library upgrade that
changes the loss) passes them all. These figures were read off this suite's tiny model and data
with the pinned installs; when a change moves them on purpose, say why in the commit and re-pin.
"""

import pytest

from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe

GOLDEN_LORA = [5.9741, 5.8832, 5.8206, 5.7966]
GOLDEN_FULL = [5.9741, 5.7207, 5.5824, 5.5490]


def first_losses(path) -> list[float]:
    recipe, recipe_dir = load_recipe(path)
    return [row["loss"] for row in run_recipe(recipe, recipe_dir).run.read_metrics() if "loss" in row][:4]


def test_first_four_lora_losses_are_pinned(make_recipe):
    losses = first_losses(make_recipe(train={"max_steps": 4, "logging_steps": 1, "save_steps": 4}))
    assert losses == pytest.approx(GOLDEN_LORA, abs=2e-4), f"first four losses moved: {losses}"


def test_first_four_full_finetuning_losses_are_pinned(make_recipe):
    recipe = make_recipe(
        adapter={"kind": "full"}, train={"max_steps": 4, "logging_steps": 1, "save_steps": 4, "learning_rate": 1e-3}
    )
    losses = first_losses(recipe)
    assert losses == pytest.approx(GOLDEN_FULL, abs=2e-4), f"first four losses moved: {losses}"
