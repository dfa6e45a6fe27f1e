"""SFT end to end on a tiny config-built model: run directory contract, what trains, reload, resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe


def train(path, *overrides, resume=False):
    recipe, recipe_dir = load_recipe(path, list(overrides))
    return run_recipe(recipe, recipe_dir, resume=resume).run


def test_lora_run_writes_the_run_directory_contract(make_recipe):
    run = train(make_recipe(eval={"exact_match": {"max_new_tokens": 8}, "before_after": True}, export={"merged": True}))
    files = {p.name for p in run.path.iterdir()}
    assert {"recipe.resolved.yaml", "manifest.json", "metrics.jsonl", "summary.json", "plots", "checkpoints", "final"} <= files
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["packages"]["transformers"] and manifest["ended_at"]
    assert all(v.startswith("sha256:") for v in manifest["data_fingerprints"].values())
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in rows[1:])
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train"]["steps"] == 6
    assert summary["train"]["final_loss"] == rows[-1]["loss"]
    assert set(summary["eval"]) == {"before", "after", "delta", "tasks"} and summary["eval"]["after"]["n"] == 6
    held_out = summary["eval"]["tasks"]["after"]["heldout"]  # the same figure in the task table (reports, gates)
    assert held_out["metrics"]["exact_match"]["value"] == summary["eval"]["after"]["exact_match"] and held_out["n"] == 6
    assert (run.path / "eval" / "results.md").is_file()
    assert (run.path / "plots" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert summary["export"]["merged"]["max_abs_logit_diff"] < 1e-4


def test_lora_trains_adapters_only_and_final_reloads_with_plain_peft(make_recipe, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train(make_recipe())
    base = load_file(tiny_model_dir / "model.safetensors")
    adapter = load_file(run.path / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B never moved"

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run.path / "final").eval()
    # The frozen base is untouched: reloading the adapter onto the original weights reproduces the trained model.
    for name, tensor in reloaded.get_base_model().state_dict().items():
        key = name.replace("base_layer.", "")
        if "lora_" not in name and key in base:
            assert torch.equal(tensor, base[key]), name
    merged_dir = run.path / "merged-check"
    tok = AutoTokenizer.from_pretrained(run.path / "final")
    batch = tok(["Greet Ada number 3."], return_tensors="pt")
    with torch.no_grad():
        adapter_logits = reloaded(**batch).logits
        reloaded.merge_and_unload().save_pretrained(merged_dir)
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir)(**batch).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)


def test_full_finetune_moves_every_weight(make_recipe, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run = train(make_recipe(adapter={"kind": "full"}, train={"learning_rate": 1e-3}))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = AutoModelForCausalLM.from_pretrained(run.path / "final").state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), set(before) - set(moved)
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["train"]["trainable_params"] == summary["train"]["total_params"]


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(make_recipe, tmp_path):
    path = make_recipe(adapter={"dropout": 0.1})  # dropout makes the RNG state part of what must be restored
    whole = train(path)
    # Recreate the state a kill after step 2 leaves behind: checkpoint-2 complete, later work lost.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole.path, interrupted)
    for name in ("final", "summary.json", "checkpoints/checkpoint-4", "checkpoints/checkpoint-6"):
        shutil.rmtree(interrupted / name) if (interrupted / name).is_dir() else (interrupted / name).unlink()
    (interrupted / "checkpoints" / ".staging" / "checkpoint-4").mkdir(parents=True)  # half-written, must be ignored
    resumed = train(path, f"train.output_dir={interrupted}", resume=True)
    a, b = whole.read_metrics(), resumed.read_metrics()
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], abs=1e-4)
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["train"]["resumed_from"].endswith("checkpoint-2")


def test_existing_run_dir_is_not_overwritten(make_recipe):
    from llmtune.errors import UserError

    path = make_recipe()
    train(path)
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(path)


def test_cpu_loss_path_equals_trl_fused_loss(tiny_model_dir, tiny_tokenizer):
    """The CPU workaround in methods/sft.py must optimise exactly TRL's objective."""
    from conftest import greeting_rows
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import add_fused_lm_head

    from llmtune.data.template import tokenize_example

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids, labels = tokenize_example(greeting_rows(1)[0]["messages"], tiny_tokenizer, "model")
    ids, lab = torch.tensor([input_ids]), torch.tensor([labels])
    with torch.no_grad():
        plain = model(input_ids=ids, labels=lab).loss
        add_fused_lm_head(model)
        out = model(input_ids=ids, labels=lab, fused_lm_head=True)
        fused = -out.log_probs.sum() / out.label_mask.sum()
    assert torch.allclose(plain, fused, atol=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(make_recipe, tmp_path):
    """batch 4 x 1 and batch 2 x 2 see the same rows per step and average over the same tokens."""
    from safetensors.torch import load_file

    path = make_recipe(train={"max_steps": 2, "learning_rate": 1e-2})
    one = train(path, "train.batch_size=4", "train.grad_accum=1", f"train.output_dir={tmp_path / 'one'}")
    two = train(path, "train.batch_size=2", "train.grad_accum=2", f"train.output_dir={tmp_path / 'two'}")
    a = load_file(one.final / "adapter_model.safetensors")
    b = load_file(two.final / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert one.read_metrics()[0]["loss"] == pytest.approx(two.read_metrics()[0]["loss"], abs=1e-5)


@pytest.mark.parametrize("batching", [{"packing": True}, {"padding_free": True}, {"group_by_length": True}])
def test_packed_padding_free_and_length_grouped_training(make_recipe, tmp_path, batching):
    run = train(make_recipe(data=batching), "train.max_steps=2")
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["train"]["final_loss"] > 0
    if batching.get("packing"):
        packing = summary["data"]["packing"]
        assert packing["examples"] == 32 and packing["rows"] < 32  # 32 short rows fit in far fewer 64-token rows
    # The tokenizer in final/ carries the chat template training used.
    assert (
        json.loads((run.path / "final" / "tokenizer_config.json").read_text()).get("chat_template")
        or (run.path / "final" / "chat_template.jinja").is_file()
    )


def test_streaming_training_reads_rows_as_it_goes_and_reports_drops(make_recipe, tmp_path):
    from conftest import greeting_rows, write_jsonl

    rows = greeting_rows(40)
    rows[3] = "{broken"
    stream = write_jsonl(tmp_path / "stream.jsonl", rows)
    run = train(
        make_recipe(data={"sources": [{"path": str(stream)}], "streaming": True, "shuffle_buffer": 8}), "train.max_steps=3"
    )
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["train"]["steps"] == 3 and summary["data"]["streaming"]
    assert summary["data"]["rows_streamed"] >= 12 and summary["data"]["dropped"]["not valid JSON"]["first"] == ["stream.jsonl:4"]
    from llmtune.errors import UserError

    with pytest.raises(UserError, match="stream.jsonl:4: not valid JSON"):
        train(
            make_recipe(data={"sources": [{"path": str(stream)}], "streaming": True, "strict": True}),
            "train.max_steps=3",
            f"train.output_dir={tmp_path / 'strict'}",
        )
