"""Export: merged adapters equal the adapter, quantized artifacts reload with plain transformers,
GGUF files read back to exactly the weights their format promises, and every record says what it cost."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.cli import main
from llmtune.errors import UserError
from llmtune.export.formats import export_model


def build_model(kind: str, tokenizer_dir, out_dir, tie: bool = False):
    """A 2-layer model of the given family, with the tiny BPE tokenizer, saved to out_dir."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[kind]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # vocab_size above the tokenizer's: the GGUF vocabulary must be padded to the embedding rows.
    config = config_cls(
        vocab_size=len(tokenizer) + 5,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a misplaced tensor shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize(
    "kind,tie,fmt",
    [("llama", False, "gguf-f16"), ("llama", False, "gguf-q4_0"), ("qwen2", True, "gguf-q8_0"), ("mistral", False, "gguf-f16")],
)
def test_gguf_reloads_to_the_weights_its_format_promises(kind, tie, fmt, tiny_tokenizer_dir, tmp_path):
    model_dir = build_model(kind, tiny_tokenizer_dir, tmp_path / kind, tie)
    record = export_model(model_dir, fmt, tmp_path / "out")
    assert record["ok"], record["checks"]
    checks = record["checks"]
    assert checks["weights"]["max_abs_diff"] == 0.0 and checks["weights"]["tensors"] >= 19
    assert checks["tokenizer_round_trip"]["same_ids"] == checks["tokenizer_round_trip"]["texts"]
    assert checks["tokenizer_round_trip"]["chat_template_kept"]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"model.gguf", "README.md", "report.md", "summary.json"}  # the GGUF stands alone

    # Independently of llmtune's checks: plain transformers loads the file as the same family.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    # A Mistral comes back as a Llama, as llama.cpp writes it (same computation).
    assert reloaded.config.model_type == {"mistral": "llama"}.get(kind, kind) and reloaded.config.tie_word_embeddings == tie
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir)("Greet Ada number 3. The quick brown fox.")["input_ids"]])
    with torch.no_grad():
        diff = (reloaded(ids).logits - original(ids).logits).abs().max().item()
    # f16 weights move logits by ~1e-4 here; 4-bit blocks by ~1e-1 (measured, then given headroom).
    assert diff < {"gguf-f16": 2e-3, "gguf-q8_0": 5e-2, "gguf-q4_0": 0.5}[fmt]
    assert record["cost"]["top1_agreement"] > {"gguf-f16": 0.99, "gguf-q8_0": 0.95, "gguf-q4_0": 0.7}[fmt]
    assert record["tensor_types"]["F32"] >= 5  # norms stay F32
    if fmt == "gguf-q4_0":
        assert record["tensor_types"]["Q8_0"] == (1 if tie else 2)  # embedding (and untied head) stay 8-bit


def test_gguf_weight_check_catches_a_wrong_rotary_layout(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Without llama.cpp's q/k permutation the file loads, but the weights read back are wrong."""
    from llmtune.export import gguf

    model_dir = build_model("llama", tiny_tokenizer_dir, tmp_path / "llama")
    monkeypatch.setattr(gguf, "permute_for_rope", lambda weight, n_head: weight)
    record = export_model(model_dir, "gguf-f16", tmp_path / "out")
    assert not record["ok"] and not record["checks"]["weights"]["ok"]


def _adapter_dir(tiny_model_dir, tmp_path, peft_config):
    """A saved adapter with non-trivial weights (as after training), tokenizer beside it."""
    from peft import get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), peft_config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out, model.eval()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_export_equals_the_adapter(method, tiny_model_dir, tmp_path):
    from peft import IA3Config, LoraConfig

    config = (
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        if method == "ia3"
        else LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=method == "dora")
    )
    adapter_dir, adapted = _adapter_dir(tiny_model_dir, tmp_path, config)
    record = export_model(adapter_dir, "merged", tmp_path / "merged")
    assert record["ok"] and record["kind"] == "merged"
    assert record["checks"]["merged_equals_trained"]["max_abs_logit_diff"] < 1e-4

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "merged")("Greet Chen number 12.")["input_ids"]])
    with torch.no_grad():
        adapter_logits, merged_logits = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4)
    assert not torch.allclose(base_logits, merged_logits, atol=1e-3), "the adapter changed nothing: the test proves nothing"
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "base_model:" in card and f"{record['cost']['perplexity_change']:+.2%}" in card


def test_prefix_tuning_is_exported_as_an_adapter_that_names_its_base(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PrefixTuningConfig

    adapter_dir, _ = _adapter_dir(tiny_model_dir, tmp_path, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    record = export_model(adapter_dir, "merged", tmp_path / "out")
    assert record["ok"] and record["kind"] == "adapter" and "cannot be merged" in record["note"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    assert "cannot be merged" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(UserError, match="cannot be merged"):
        export_model(adapter_dir, "bnb-4bit", tmp_path / "q")


@pytest.mark.parametrize("fmt", ["bnb-8bit", "bnb-4bit"])
def test_bitsandbytes_export_reloads_quantized_without_arguments(fmt, tiny_model_dir, tmp_path):
    record = export_model(tiny_model_dir, fmt, tmp_path / "out")
    assert record["ok"], record["checks"]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes"
    if fmt == "bnb-4bit":
        assert saved["load_in_4bit"] and saved["bnb_4bit_quant_type"] == "nf4" and saved["bnb_4bit_use_double_quant"]
    else:
        assert saved["load_in_8bit"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no quantization arguments
    layer = {"bnb-8bit": "Linear8bitLt", "bnb-4bit": "Linear4bit"}[fmt]
    assert sum(type(m).__name__ == layer for m in reloaded.modules()) == 14  # 7 projections x 2 layers
    cost = record["cost"]
    assert abs(cost["perplexity_change"]) < (0.01 if fmt == "bnb-8bit" else 0.05)
    assert cost["max_abs_logit_diff"] > 0  # quantization did happen
    assert record["bytes"] < sum(p.stat().st_size for p in tiny_model_dir.iterdir())


def test_export_of_a_run_records_in_its_summary_with_a_model_card(make_recipe, tmp_path):
    from llmtune.pipeline import run_recipe
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(make_recipe(train={"max_steps": 2}, eval={"exact_match": {"max_new_tokens": 4}}))
    run = run_recipe(recipe, recipe_dir).run
    assert main(["export", str(run.path), "--format", "gguf-q8_0"]) == 0
    summary = json.loads((run.path / "summary.json").read_text())
    record = summary["export"]["gguf-q8_0"]
    assert record["ok"] and record["path"] == str(run.path / "export" / "gguf-q8_0")
    assert record["heldout"] == "6 held-out rows of the run's data"
    assert record["cost"]["perplexity_change"] == pytest.approx(0, abs=0.02)
    card = (run.path / "export" / "gguf-q8_0" / "README.md").read_text()
    manifest = json.loads((run.path / "manifest.json").read_text())
    for fingerprint in manifest["data_fingerprints"].values():
        assert fingerprint in card
    assert "exact_match" in card and "## Recipe" in card and 'gguf_file="model.gguf"' in card
    assert summary["eval"]["after"]  # the run's own results are untouched


def test_export_input_mistakes_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "merged"]) == 2
    assert "neither an llmtune run directory" in capsys.readouterr().err
    assert main(["export", "smollm2-135m-instruct", "--format", "gguf-q3"]) == 2
    assert "unknown format 'gguf-q3'" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "merged", "--format", "bnb-4bit", "--output", str(tmp_path / "x")]) == 2


def test_export_never_replaces_a_directory_that_is_not_an_export(tiny_model_dir, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier llmtune export"):
        export_model(tiny_model_dir, "merged", tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_unsupported_gguf_architecture_is_refused_before_any_work(tiny_tokenizer_dir, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400))
    model.save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="model type 'gpt2' is not supported"):
        export_model(tmp_path / "gpt2", "gguf-q8_0", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_zero3_final_without_gathered_weights_is_refused_with_the_fix(tmp_path):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text("data: {sources: [{path: a.jsonl}]}\n")
    save_file({"model.embed_tokens.weight": torch.empty(0)}, run / "final" / "model.safetensors")
    with pytest.raises(UserError, match="stage3_gather_16bit_weights_on_model_save: true"):
        export_model(run, "merged")
