"""Each method is one module that declares what the rest of llmtune needs; the rest asks it.

These tests hold the architecture in place: the protocol is complete for every method, the readable
top (pipeline, plan, schema) never switches on a method's name, and `llmtune plan` counts what
each method really holds: a reward model's score head, DPO's and PPO's references, PPO's value
head and reward model.
"""

import re
from pathlib import Path

import pytest

import llmtune
from llmtune.methods import METHODS, PROTOCOL
from llmtune.plan import estimate_memory
from llmtune.recipe import load_recipe

SOURCE = Path(llmtune.__file__).parent


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_method_declares_the_whole_protocol(kind):
    module = METHODS[kind]
    assert module.KIND == kind and module.__name__ == f"llmtune.methods.{kind}"
    assert not [name for name in PROTOCOL if not hasattr(module, name)]
    assert module.FORMATS and all(callable(rule) for rule in module.RULES)
    if module.MODEL == "sequence_classifier":
        assert callable(module.head_labels)


@pytest.mark.parametrize(
    "path", ["pipeline.py", "plan.py", "recipe/schema.py", "recipe/rules.py", "launch.py", "data/__init__.py"]
)
def test_the_shared_modules_ask_the_method_instead_of_naming_it(path):
    text = (SOURCE / path).read_text()
    kinds = "|".join(METHODS)
    switches = re.findall(rf"""method\.kind\s*(?:==|!=|in|not in)\s*[("']|["']({kinds})["']\s*(?:==|!=|in)\s""", text)
    assert not switches, f"{path} switches on a method's name: {switches}"


def test_a_method_module_imports_nothing_heavy_at_its_top(tmp_path):
    """The schema is built from the method modules, so `llmtune validate` must not pull in torch or TRL."""
    import subprocess
    import sys

    code = (
        "import sys, llmtune.methods, llmtune.recipe.schema; "
        "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def plan(make_recipe, method, fmt="preference", **sections):
    path = make_recipe(method=method, data={"sources": [{"path": "pairs.jsonl", "format": fmt}], "eval_sources": []}, **sections)
    recipe, _ = load_recipe(path)
    return estimate_memory(recipe, device="cpu")


def test_plan_counts_a_reward_models_score_head_not_a_language_model_head(make_recipe, tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    sft = estimate_memory(load_recipe(make_recipe(adapter={"kind": "full"}))[0], device="cpu")
    reward = plan(make_recipe, {"kind": "reward"}, adapter={"kind": "full"})
    # The vocabulary head (untied) gives way to a one-output score head: hidden_size weights.
    assert reward.total_params == sft.total_params - config.vocab_size * config.hidden_size + config.hidden_size
    assert (
        "logits and loss" not in reward.gpu and reward.gpu["activations of the rejected responses"] == reward.gpu["activations"]
    )


def test_plan_counts_dpo_pairs_and_its_reference_only_with_whole_weights(make_recipe):
    lora = plan(make_recipe, {"kind": "dpo"})
    full = plan(make_recipe, {"kind": "dpo"}, adapter={"kind": "full"})
    assert "frozen reference model" not in lora.gpu  # under LoRA the reference is the policy, adapters disabled
    assert full.gpu["frozen reference model"] == full.total_params * 4  # fp32 on CPU
    assert lora.gpu["activations of the rejected responses"] == lora.gpu["activations"]


def test_plan_counts_ppo_value_head_reference_and_reward_model(make_recipe, tiny_model_dir):
    method = {"kind": "ppo", "ppo": {"reward_model": str(tiny_model_dir), "mini_batch_size": 2}}
    lora = plan(make_recipe, method, fmt="prompt_only")
    full = plan(make_recipe, method, fmt="prompt_only", adapter={"kind": "full"})
    hidden = 64
    assert lora.gpu["value head"] == (hidden + 1) * 16
    assert "frozen reference model" not in lora.gpu and full.gpu["frozen reference model"] == full.total_params * 4
    # The reward model is counted from its folder's config as a 1-label classifier.
    reward = plan(make_recipe, {"kind": "reward"}, adapter={"kind": "full"})
    assert lora.gpu["reward model"] == reward.total_params * 4
    assert lora.gpu["generation KV cache"] > 0
