"""ORPO on the tiny model: reference-free (nothing but the policy runs), and the held-out pairs move."""

import torch
from conftest import preference_rows, recipe_for
from safetensors.torch import load_file

from llmtune.pipeline import run_recipe


def pair_recipe(tmp_path, tiny_model_dir, method, **train):
    return recipe_for(
        tmp_path,
        tiny_model_dir,
        method,
        preference_rows,
        "preference",
        eval={"before_after": True},
        **({"learning_rate": 1e-2} | train),
    )


def no_reference_pass(monkeypatch):
    """Fail the test if anything runs the model with its adapters disabled (a reference pass)."""
    import peft

    def refuse(*args, **kwargs):
        raise AssertionError("a reference-free method ran the model with its adapters disabled")

    monkeypatch.setattr(peft.PeftModel, "disable_adapter", refuse)


def check_reference_free_lora_run(result, tiny_model_dir):
    assert not hasattr(result.trainer, "ref_model") and set(result.model.peft_config) == {"default"}
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in result.model.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name
    adapter = load_file(result.run.path / "final" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert not (result.run.path / "final" / "ref").exists()


def test_orpo_under_lora_prefers_the_chosen_answers_of_held_out_pairs_with_no_reference(tmp_path, tiny_model_dir, monkeypatch):
    no_reference_pass(monkeypatch)
    result = run_recipe(*pair_recipe(tmp_path, tiny_model_dir, {"kind": "orpo"}))
    before, after = result.summary["eval"]["before"], result.summary["eval"]["after"]
    assert before["n"] == after["n"] == 16
    # Measured: pairs preferring the chosen answer 44% -> 100%, mean per-token margin -0.003 -> 0.12.
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"] + 0.05 and after["logp_margin"] > before["logp_margin"]

    rows = result.run.read_metrics()
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["nll_loss"] < rows[0]["nll_loss"]
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["rewards/margins"] > 0
    assert {"log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected"} <= set(rows[-1])
    assert result.summary["train"]["tokens_per_s"]  # the batches carry input_ids, so tokens are counted
    check_reference_free_lora_run(result, tiny_model_dir)


def test_orpo_sees_the_answers_as_sft_renders_them(tiny_tokenizer):
    """The chat template's rendering, loss on the answer and its end of turn: no extra BOS or EOS
    (TRL's experimental ORPOTrainer adds both) and no loss on the prompt."""
    from llmtune.data.template import tokenize_example
    from llmtune.methods.trainers.pairs import PairCollator, tokenize_pairs

    row = {
        "prompt": [{"role": "user", "content": "Greet Ada."}],
        "chosen": [{"role": "assistant", "content": "Hello Ada!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    batch = PairCollator(tiny_tokenizer.pad_token_id)(list(tokenize_pairs([row], tiny_tokenizer, "model")))
    ids, labels = tokenize_example(row["prompt"] + row["chosen"], tiny_tokenizer, "model")
    assert batch["input_ids"][0, : len(ids)].tolist() == ids and batch["labels"][0, : len(ids)].tolist() == labels
    answer = tiny_tokenizer.decode([t for t in batch["labels"][1].tolist() if t != -100])
    assert answer == "No.<|im_end|>\n"
    assert tiny_tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()]).startswith("<|im_start|>user")
