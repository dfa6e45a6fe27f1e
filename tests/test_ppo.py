"""PPO on the tiny model with a known programmatic reward: the reward rises, the reference stays put.

The reward (`letters_a_to_m`, below, named by import path as a recipe would) is the share of the
response's characters among a-m: a dense signal that a randomly initialised model can climb in a
few updates. Everything runs from fixed seeds, so the figures asserted here are reproducible.
"""

import json

import pytest
import torch
from conftest import NAMES, write_jsonl
from safetensors.torch import load_file

from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe


def letters_a_to_m(prompts, completions, **kwargs):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch in "abcdefghijklm" for ch in t) / max(len(t), 1) for t in texts]


def prompt_rows(n, offset=0):
    return [{"prompt": [{"role": "user", "content": f"Greet {NAMES[i % 10]} number {i}."}]} for i in range(offset, offset + n)]


def ppo_recipe(tmp_path, tiny_model_dir, adapter, steps=12, lr=3e-3, **ppo):
    train = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(16, offset=100))
    recipe = {
        "model": {"name": str(tiny_model_dir)},
        "data": {
            "sources": [{"path": str(train), "format": "prompt_only"}],
            "eval_sources": [{"path": str(held_out), "format": "prompt_only"}],
            "max_length": 64,
        },
        "method": {
            "kind": "ppo",
            "ppo": {"reward_function": "test_ppo:letters_a_to_m", "max_new_tokens": 8, "mini_batch_size": 8, "ppo_epochs": 2}
            | ppo,
        },
        "adapter": adapter,
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": steps,
            "batch_size": 16,
            "learning_rate": lr,
            "lr_scheduler": "constant",
            "seed": 3,
            "save_steps": 6,
        },
    }
    import yaml

    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


@pytest.mark.slow  # CI runs it; a few minutes on a busy 2-core CPU
def test_ppo_raises_a_programmatic_reward_and_keeps_the_reference_frozen(tmp_path, tiny_model_dir):
    recipe, recipe_dir = ppo_recipe(tmp_path, tiny_model_dir, {"kind": "full"})
    result = run_recipe(recipe, recipe_dir)
    rows = result.run.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, 13))
    logged = {
        "reward_mean",
        "reward_std",
        "kl",
        "kl_coef",
        "entropy",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "policy_loss",
        "explained_variance",
        "response_length",
        "tokens_per_s",
        "loss",
        "lr",
    }
    assert all(logged <= set(r) for r in rows)
    first, last = [sum(r["reward_mean"] for r in part) / 3 for part in (rows[:3], rows[-3:])]
    assert last > first + 0.05, (first, last)  # measured: 0.19 -> 0.30
    # Held-out prompts, same sampling seed before and after: the score rises; KL to the reference is finite and positive.
    ev = result.summary["eval"]
    assert ev["after"]["reward_mean"] > ev["before"]["reward_mean"] + 0.05
    assert ev["before"]["kl"] == 0.0 and 0 < ev["after"]["kl"] < 10
    # The whole-weights reference is a frozen copy: bit-identical to the base on disk.
    policy, reference = result.model, result.trainer.reference
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, base[name]), name
    assert any(not torch.equal(p.detach(), base[n]) for n, p in policy.named_parameters())
    # final/ is a plain causal LM plus the value head.
    assert (result.run.path / "final" / "model.safetensors").is_file()
    assert set(load_file(result.run.path / "final" / "value_head.safetensors")) == {"weight", "bias"}


def test_ppo_under_lora_uses_the_adapters_disabled_base_as_reference(tmp_path, tiny_model_dir):
    recipe, recipe_dir = ppo_recipe(
        tmp_path, tiny_model_dir, {"kind": "lora", "r": 8, "alpha": 16}, steps=3, lr=3e-2, kl_target=1.0
    )
    result = run_recipe(recipe, recipe_dir)
    base = load_file(tiny_model_dir / "model.safetensors")
    policy = result.model
    assert result.trainer.reference is None  # no second copy
    for name, tensor in policy.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name
    rows = result.run.read_metrics()
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout's policy is the reference
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved
    adapter = load_file(result.run.path / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)


@pytest.mark.slow  # CI runs it; a few minutes on a busy 2-core CPU
def test_ppo_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    import shutil

    recipe, recipe_dir = ppo_recipe(tmp_path, tiny_model_dir, {"kind": "lora", "r": 4, "alpha": 8}, steps=4, lr=3e-2)
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"save_steps": 2})})
    full = run_recipe(recipe, recipe_dir)
    uninterrupted = full.run.read_metrics()
    final = load_file(full.run.path / "final" / "adapter_model.safetensors")
    # Simulate a run killed after step 3: checkpoint-2 is the newest complete one.
    shutil.rmtree(full.run.path / "checkpoints" / "checkpoint-4")
    shutil.rmtree(full.run.path / "final")
    (full.run.path / "summary.json").unlink()
    with full.run.metrics.open("a") as f:  # a stale row from the lost step
        f.write(json.dumps({"step": 3, "reward_mean": -1.0}) + "\n")
    resumed = run_recipe(recipe, recipe_dir, resume=True)
    rows = resumed.run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    drop = ("tokens_per_s", "step_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in uninterrupted
    ]
    again = load_file(resumed.run.path / "final" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_fewer_prompts_than_one_ppo_batch_is_an_input_error(tmp_path, tiny_model_dir, capsys):
    from llmtune.cli import main

    ppo_recipe(tmp_path, tiny_model_dir, {"kind": "lora", "r": 4, "alpha": 8})  # 48 prompts
    assert main(["train", str(tmp_path / "ppo.yaml"), "train.batch_size=64"]) == 2
    assert (
        "data.sources: 48 prompts, fewer than one PPO batch (64 x 1 process(es)); add prompts or lower train.batch_size"
    ) in capsys.readouterr().err
