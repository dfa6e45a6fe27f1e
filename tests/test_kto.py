"""KTO through TRL on the tiny model: what it reads, what it learns on held-out rows, what stays frozen."""

import pytest
import torch
from conftest import NAMES, preference_rows, recipe_for
from safetensors.torch import load_file

from llmtune.pipeline import run_recipe


def feedback_rows(n, offset=0):
    # Unpaired: every row its own prompt; a greeting by name is desirable, a refusal is not.
    return [
        {
            "prompt": f"Greet {NAMES[i % 10]} number {i}.",
            "completion": f"Hello {NAMES[i % 10]}! You are {i}." if i % 2 == 0 else "No.",
            "label": i % 2 == 0,
        }
        for i in range(offset, offset + n)
    ]


def kto_recipe(tmp_path, tiny_model_dir, rows, fmt, n_train=32, n_held_out=16, method=None, adapter=None, **train):
    return recipe_for(
        tmp_path,
        tiny_model_dir,
        {"kind": "kto"} | (method or {}),
        rows,
        fmt,
        adapter,
        n_train,
        n_held_out,
        eval={"before_after": True},
        **({"learning_rate": 1e-2} | train),
    )


def test_kto_under_lora_raises_the_held_out_margin_of_desirable_over_undesirable_answers(tmp_path, tiny_model_dir):
    result = run_recipe(*kto_recipe(tmp_path, tiny_model_dir, feedback_rows, "feedback"))
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    assert before["n"] == after["n"] == 16
    # Measured: margin -29.9 -> -25.2; the desirable answers gain, the undesirable ones lose.
    assert after["margin"] > before["margin"] + 3
    assert after["logp_desirable"] > before["logp_desirable"] and after["nll_undesirable"] > before["nll_undesirable"]
    assert result.summary["data"]["labels"] == {"desirable": 16, "undesirable": 16}

    rows = result.run.read_metrics()
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy = reference at the first step: sigmoid(0) = 0.5
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    assert {"kl", "logps/chosen", "logps/rejected"} <= set(rows[-1])  # TRL's metrics pass through to metrics.jsonl

    # The reference is a frozen copy of the starting adapter: TRL added it, nothing else was held.
    assert result.trainer.ref_model is None and set(result.model.peft_config) == {"default", "ref"}
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in result.model.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name  # the base never moved
    adapter = load_file(result.run.path / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_kto_reads_preference_pairs_as_a_desirable_and_an_undesirable_answer(tmp_path, tiny_model_dir):
    result = run_recipe(*kto_recipe(tmp_path, tiny_model_dir, preference_rows, "preference", n_train=16, n_held_out=8))
    summary = result.summary
    assert summary["data"]["labels"] == {"desirable": 16, "undesirable": 16} and summary["eval"]["after"]["n"] == 16
    assert summary["eval"]["after"]["margin"] > summary["eval"]["before"]["margin"] + 2


def test_kto_recipe_mistakes_name_the_key(tmp_path, tiny_model_dir):
    from llmtune.errors import UserError

    with pytest.raises(UserError) as info:
        kto_recipe(tmp_path, tiny_model_dir, feedback_rows, "feedback", batch_size=1)
    assert info.value.problems[0].startswith("train.batch_size: kto estimates its KL term from the other rows")
    kto_recipe(
        tmp_path, tiny_model_dir, feedback_rows, "feedback", method={"kto": {"loss_type": "apo_zero_unpaired"}}, batch_size=1
    )  # no KL term, no constraint
    with pytest.raises(UserError) as info:
        kto_recipe(tmp_path, tiny_model_dir, feedback_rows, "messages")
    assert "method.kind kto reads feedback or preference rows, not messages" in info.value.problems[0]
    with pytest.raises(UserError) as info:
        kto_recipe(
            tmp_path, tiny_model_dir, feedback_rows, "feedback", adapter={"kind": "lora", "target_modules": ["q_proj", "lm_head"]}
        )
    assert info.value.problems == [
        "adapter.target_modules: kto reads log-probabilities from lm_head's own weight, so an "
        "adapter on lm_head would never train; remove lm_head"
    ]
