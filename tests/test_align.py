"""Reward modelling, DPO and GRPO through TRL on the tiny model: what trains, what is measured, what reloads."""

import pytest
import torch
import yaml
from conftest import NAMES, preference_rows, recipe_for
from safetensors.torch import load_file

from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe


def test_reward_model_learns_pairs_and_final_loads_as_a_plain_sequence_classifier(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe, recipe_dir = recipe_for(tmp_path, tiny_model_dir, {"kind": "reward"}, preference_rows, "preference")
    result = run_recipe(recipe, recipe_dir)
    after = result.summary["eval"]["after"]
    assert after["n"] == 16 and after["accuracy"] == 1.0 and after["margin"] > 0.5
    rows = result.run.read_metrics()
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"accuracy", "margin"} <= set(rows[-1])  # TRL's training metrics pass through to metrics.jsonl

    # final/ is a merged, full model: plain transformers, one label, the in-memory scores.
    final = result.run.path / "final"
    assert not (final / "adapter_config.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert reloaded.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(final)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Greet Ada number 200."}, {"role": "assistant", "content": answer}], tokenize=False
        )
        for answer in ("Hello Ada! You are 200.", "No.")
    ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        reloaded_scores = reloaded(**batch).logits[:, 0]
        memory_scores = result.model.eval()(**batch).logits[:, 0]
    assert torch.allclose(reloaded_scores, memory_scores, atol=1e-4)
    assert reloaded_scores[0] > reloaded_scores[1]


def test_dpo_under_lora_moves_adapters_only_and_prefers_chosen(tmp_path, tiny_model_dir):
    recipe, recipe_dir = recipe_for(
        tmp_path, tiny_model_dir, {"kind": "dpo", "dpo": {"beta": 0.1}}, preference_rows, "preference"
    )
    result = run_recipe(recipe, recipe_dir)
    rows = result.run.read_metrics()
    assert rows[-1]["loss"] < rows[0]["loss"] < 0.7  # starts at ln 2 = 0.693 (policy = reference)
    assert rows[-1]["rewards/accuracies"] > 0.5 and rows[-1]["rewards/margins"] > 0
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in result.model.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name  # the reference (adapters disabled) never moved


@pytest.mark.slow  # CI runs it; a few minutes on a busy 2-core CPU
def test_grpo_trains_on_a_reward_function(tmp_path, tiny_model_dir):
    recipe, recipe_dir = recipe_for(
        tmp_path,
        tiny_model_dir,
        {"kind": "grpo", "grpo": {"reward_functions": ["test_ppo:letters_a_to_m"], "num_generations": 4, "max_new_tokens": 8}},
        lambda n, o=0: [{"prompt": [{"role": "user", "content": f"Greet {NAMES[i % 10]}."}]} for i in range(o, o + n)],
        "prompt_only",
        max_steps=2,
    )
    result = run_recipe(recipe, recipe_dir)
    rows = result.run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2] and all("reward" in r for r in rows)
    adapter = load_file(result.run.path / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


A_TO_M_SCORES = []  # each reward call's mean score, as scored here: what the policy really produced


def a_to_m_recorded(prompts, completions, **kwargs):
    """The share of a completion's characters among a-m (test_ppo's reward), recorded before it is returned."""
    scores = [sum(ch in "abcdefghijklm" for ch in c[0]["content"]) / max(len(c[0]["content"]), 1) for c in completions]
    A_TO_M_SCORES.append(sum(scores) / len(scores))
    return scores


def test_grpo_raises_the_reward_it_is_given(tmp_path, tiny_model_dir):
    # Whole weights: LoRA cannot move this random model's near-uniform output (lm_head's small init bounds
    # what a change of the normalised hidden state does to the logits); measured flat at lr 0.1 under LoRA.
    A_TO_M_SCORES.clear()
    recipe, recipe_dir = recipe_for(
        tmp_path,
        tiny_model_dir,
        {"kind": "grpo", "grpo": {"reward_functions": ["test_align:a_to_m_recorded"], "num_generations": 4, "max_new_tokens": 8}},
        lambda n, o=0: [{"prompt": [{"role": "user", "content": f"Greet {NAMES[i % 10]}."}]} for i in range(o, o + n)],
        "prompt_only",
        adapter={"kind": "full"},
        max_steps=12,
        batch_size=16,
        learning_rate=2e-2,
        lr_scheduler="constant",
        save_steps=12,
    )
    result = run_recipe(recipe, recipe_dir)
    # The score is read from the function's own record, not only from metrics.jsonl: a reward whose sign is
    # flipped on its way to the trainer would still "rise" in the log while the policy moves away from a-m.
    assert len(A_TO_M_SCORES) == 12, "one reward call per step, in this process"
    first, last = sum(A_TO_M_SCORES[:3]) / 3, sum(A_TO_M_SCORES[-3:]) / 3
    assert last > first + 0.3 and last > 0.5, (first, last)  # measured: 0.18 -> 0.87 (seeds 1, 2: 0.16 -> 0.79, 0.84)
    rows = result.run.read_metrics()
    assert [r["reward"] for r in rows] == pytest.approx(A_TO_M_SCORES, abs=1e-6)  # the log carries the same figures


def test_alignment_recipe_mistakes_name_the_key(tmp_path):
    from llmtune.errors import UserError

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {"data": {"sources": [{"path": "a.jsonl", "format": "prompt_only"}]}, "method": {"kind": "ppo", "dpo": {"beta": 0.5}}}
        )
    )
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems == ["method.dpo: applies to kind dpo only, not ppo; remove it"]

    path.write_text(
        yaml.safe_dump(
            {
                "data": {"sources": [{"path": "a.jsonl", "format": "messages"}]},
                "method": {"kind": "ppo"},
                "train": {"batch_size": 2},
            }
        )
    )
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "data.sources[0].format",
        "method.ppo.mini_batch_size",
        "method.ppo",
    ]
    assert info.value.problems[2].startswith("method.ppo: needs a reward")
    assert "method.kind ppo reads prompt_only or preference rows, not messages" in info.value.problems[0]
