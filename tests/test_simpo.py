"""SimPO on the tiny model: reference-free (nothing but the policy runs), and the held-out pairs move."""

import math

import pytest
from test_orpo import check_reference_free_lora_run, no_reference_pass, pair_recipe

from llmtune.pipeline import run_recipe


def test_simpo_under_lora_prefers_the_chosen_answers_of_held_out_pairs_with_no_reference(tmp_path, tiny_model_dir, monkeypatch):
    no_reference_pass(monkeypatch)
    result = run_recipe(*pair_recipe(tmp_path, tiny_model_dir, {"kind": "simpo", "simpo": {"beta": 2.0, "gamma": 0.5}}))
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    assert before["n"] == after["n"] == 16
    # Measured: pairs preferring the chosen answer 44% -> 100%, mean per-token margin -0.003 -> 0.83.
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"] + 0.5

    rows = result.run.read_metrics()
    # A random model gives both answers the same mean log-prob: the loss starts at log(1 + e^gamma).
    assert rows[0]["loss"] == pytest.approx(math.log1p(math.exp(0.5)), abs=0.05)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] == 1.0
    assert rows[-1]["rewards/margins"] > 0.5 and "nll_loss" not in rows[-1]
    check_reference_free_lora_run(result, tiny_model_dir)


def test_simpo_options_are_checked(tmp_path, tiny_model_dir):
    from llmtune.errors import UserError

    with pytest.raises(UserError) as info:
        pair_recipe(tmp_path, tiny_model_dir, {"kind": "simpo", "simpo": {"gamma": -1}})
    assert info.value.problems[0].startswith("method.simpo.gamma:")
    with pytest.raises(UserError) as info:
        pair_recipe(tmp_path, tiny_model_dir, {"kind": "orpo", "simpo": {"beta": 1.0}})
    assert info.value.problems == ["method.simpo: applies to kind simpo only, not orpo; remove it"]
