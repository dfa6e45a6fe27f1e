"""Every adaptation method on the tiny model: a few optimizer steps, then

- frozen weights are bit-identical and trainable ones moved from their (seeded) initial values,
- the trainable-parameter count is what the method implies, worked out by hand below,
- final/ reloads with plain transformers + peft and gives the in-memory model's logits.

Tiny Llama: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads (k/v width 32), untied head.
"""

import json

import pytest
import torch
from conftest import write_jsonl
from transformers import set_seed

from llmtune.errors import UserError
from llmtune.models.adapter import apply_adapter
from llmtune.models.load import resolve_precision
from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe

H, FF, LAYERS, KV = 64, 128, 2, 32
LAYER_PARAMS = H * H * 2 + H * KV * 2 + 3 * H * FF + 2 * H  # q, o, k, v, gate/up/down, two norms
LORA_R4 = 4 * ((H + H) * 2 + (H + KV) * 2 + (H + FF) * 3) * LAYERS  # r * (in + out) per adapted linear

CASES = {
    "lora": ({"kind": "lora", "r": 4}, {}, LORA_R4),
    "lora-dora-rslora": (
        {"kind": "lora", "r": 4, "alpha": 8, "use_dora": True, "use_rslora": True},
        {},
        LORA_R4 + (H * 2 + KV * 2 + FF * 2 + H) * LAYERS,
    ),  # + one magnitude per output feature
    "lora-qv": ({"kind": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, {}, 4 * ((H + H) + (H + KV)) * LAYERS),
    "lora-attention": ({"kind": "lora", "r": 4, "target_modules": "attention"}, {}, 4 * ((H + H) * 2 + (H + KV) * 2) * LAYERS),
    "qlora-4bit": ({"kind": "lora", "r": 4}, {"quantization": "4bit"}, LORA_R4),
    "qlora-8bit": ({"kind": "lora", "r": 4}, {"quantization": "8bit"}, LORA_R4),
    "full": ({"kind": "full"}, {}, "all"),
    "freeze-patterns": ({"kind": "freeze", "trainable": [r"layers\.1\."]}, {}, LAYER_PARAMS),
    "freeze-layers": ({"kind": "freeze", "freeze_layers": 1, "freeze_embeddings": True}, {}, "all-embed-layer0"),
    "prefix": ({"kind": "prefix", "num_virtual_tokens": 5}, {}, 5 * LAYERS * 2 * KV),  # a key and a value per layer
    "prompt-random": ({"kind": "prompt", "num_virtual_tokens": 5}, {}, 5 * H),
    "prompt-text": ({"kind": "prompt", "num_virtual_tokens": 5, "prompt_init_text": "Greet the person."}, {}, 5 * H),
    "ia3": ({"kind": "ia3"}, {}, (KV + KV + FF) * LAYERS),  # k and v outputs, down_proj input
}


def fresh_base(model_dir, quantization="none", labels=None, pad_token_id=None):
    from llmtune.models.load import load_causal_lm, load_classifier
    from llmtune.recipe.schema import ModelSection

    cfg = ModelSection(name=str(model_dir), quantization=quantization)
    precision = resolve_precision("float32")
    if labels:
        return load_classifier(cfg, str(model_dir), precision, labels, pad_token_id)
    return load_causal_lm(cfg, str(model_dir), precision)


def expected_count(expected, model_dir):
    from safetensors.torch import load_file

    base = load_file(model_dir / "model.safetensors")
    total = sum(t.numel() for t in base.values())
    if expected == "all":
        return total
    if expected == "all-embed-layer0":
        return total - base["model.embed_tokens.weight"].numel() - LAYER_PARAMS
    return expected


def check_trained_model(result, recipe, model_dir, expected, labels=None):
    model = result.model
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert result.summary["train"]["trainable_params"] == sum(t.numel() for t in trainable.values())
    if expected is not None:
        assert result.summary["train"]["trainable_params"] == expected_count(expected, model_dir)

    # Re-create the initial model the way the run did (same seed) and compare weight by weight.
    set_seed(recipe.train.seed)
    initial = fresh_base(model_dir, recipe.model.quantization, labels, result.tokenizer.pad_token_id)
    initial = apply_adapter(initial, recipe.adapter, task="SEQ_CLS" if labels else "CAUSAL_LM", tokenizer_path=str(model_dir))
    initial_params = dict(initial.named_parameters())
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param.detach(), initial_params[name].detach()), f"{name} is trainable but did not move"
        else:
            assert torch.equal(param.detach(), initial_params[name].detach()), f"{name} is frozen but changed"


def check_reload(result, recipe, model_dir, labels=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    final = result.run.final
    auto = AutoModelForSequenceClassification if labels else AutoModelForCausalLM
    if recipe.adapter.kind in ("full", "freeze"):
        reloaded = auto.from_pretrained(final)
    else:
        reloaded = PeftModel.from_pretrained(
            fresh_base(model_dir, recipe.model.quantization, labels, result.tokenizer.pad_token_id), final
        )
    batch = result.tokenizer(["Greet Ada number 3.", "Hello"], return_tensors="pt", padding=True)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        actual = reloaded.eval()(**batch).logits
    tolerance = 1e-5
    if recipe.model.quantization != "none":
        # bitsandbytes 0.50 on CPU runs 4/8-bit layers through different kernels depending on whether
        # the weights were converted for inference (see above): ~1e-5 per layer between a training and
        # a reloaded copy with identical weights (measured; ~1e-3 in these logits). Keep the check
        # meaningful: the trained adapter must move the logits far more than the tolerance.
        tolerance = 1e-2
        with torch.no_grad(), reloaded.disable_adapter():
            base_logits = reloaded(**batch).logits
        assert (expected - base_logits).abs().max() > 10 * tolerance, "adapter effect too small to test reload"
    assert torch.allclose(expected, actual, atol=tolerance), (expected - actual).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_causal_lm_method(case, make_recipe, tiny_model_dir):
    adapter, model, expected = CASES[case]
    path = make_recipe(
        adapter=adapter, model={"name": str(tiny_model_dir), **model}, train={"max_steps": 3, "learning_rate": 1e-2}
    )
    recipe, recipe_dir = load_recipe(path)
    result = run_recipe(recipe, recipe_dir)
    check_trained_model(result, recipe, tiny_model_dir, expected)
    # Before check_reload: bitsandbytes' CPU inference kernel converts 4-bit weights on their first
    # no-grad forward (un-nesting double-quantized statistics), so check the training state first.
    check_method_specifics(case, result, tiny_model_dir)
    check_reload(result, recipe, tiny_model_dir)


def check_method_specifics(case, result, model_dir):
    """What the parameter count alone would not notice if an option were silently ignored."""
    model = result.model
    if case == "lora-dora-rslora":
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r), not alpha / r
        assert "default" in layer.lora_magnitude_vector
    if case == "qlora-4bit":
        weight = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
        assert weight.quant_type == "nf4" and weight.quant_state.nested, "nf4 with double quantization"
    if case == "qlora-8bit":
        assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.int8
    if case == "prompt-text":
        from transformers import AutoModelForCausalLM

        ids = result.tokenizer("Greet the person.", add_special_tokens=False)["input_ids"]
        embeddings = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight
        initial = embeddings[(ids * 5)[:5]]  # PEFT repeats the text's tokens to fill the virtual tokens
        set_seed(7)
        from llmtune.models.adapter import apply_adapter as build

        fresh = build(fresh_base(model_dir), result_recipe(result).adapter, tokenizer_path=str(model_dir))
        assert torch.equal(fresh.prompt_encoder["default"].embedding.weight.detach(), initial.detach())


@pytest.mark.parametrize(
    "adapter",
    [{"kind": "full"}, {"kind": "freeze", "trainable": [r"^score\."]}, {"kind": "lora", "r": 4}],
    ids=["full", "frozen-backbone", "lora"],
)
def test_classification_head(adapter, tmp_path, make_recipe, tiny_model_dir):
    rows = [{"text": f"{verb} Ada number {i}.", "label": verb.lower()} for i in range(24) for verb in ("Greet", "Thank", "Call")]
    write_jsonl(tmp_path / "cls.jsonl", rows[:60])
    write_jsonl(tmp_path / "cls_test.jsonl", rows[60:] + [{"text": "Fire Ada.", "label": "fire"}])
    path = make_recipe(
        method={"kind": "classification"},
        adapter=adapter,
        data={
            "sources": [{"path": str(tmp_path / "cls.jsonl"), "format": "classification"}],
            "eval_sources": [{"path": str(tmp_path / "cls_test.jsonl"), "format": "classification"}],
        },
        train={"max_steps": 4, "learning_rate": 1e-2},
        eval={"before_after": True},
    )
    recipe, recipe_dir = load_recipe(path)
    result = run_recipe(recipe, recipe_dir)
    labels = ["call", "greet", "thank"]
    assert result.model.config.id2label == dict(enumerate(labels))
    assert result.summary["data"]["labels"] == {"call": 20, "greet": 20, "thank": 20}
    assert result.summary["data"]["dropped"]["label not seen in the training data"]["rows"] == 1
    after = result.summary["eval"]["after"]
    assert after["n"] == 12 and 0 <= after["macro_f1"] <= 1 and 0 <= after["accuracy"] <= 1
    head = sum(p.numel() for n, p in result.model.named_parameters() if p.requires_grad and "score" in n)
    assert head == H * len(labels), "the new head must train whatever the adapter"
    expected = {"full": None, "freeze": H * len(labels), "lora": LORA_R4 + H * len(labels)}[adapter["kind"]]
    check_trained_model(result, recipe, tiny_model_dir, expected, labels=labels)
    check_reload(result, recipe, tiny_model_dir, labels=labels)
    predictions = [json.loads(l) for l in (result.run.path / "eval" / "predictions-after.jsonl").read_text().splitlines()]
    assert len(predictions) == 12
    # Recompute the reported figures by hand from the predictions written beside them.
    assert after["accuracy"] == pytest.approx(sum(p["gold"] == p["predicted"] for p in predictions) / 12)
    f1s = []
    for label in labels:
        tp = sum(p["gold"] == label == p["predicted"] for p in predictions)
        fp = sum(p["predicted"] == label != p["gold"] for p in predictions)
        fn = sum(p["gold"] == label != p["predicted"] for p in predictions)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert after["macro_f1"] == pytest.approx(sum(f1s) / len(labels))


def test_prefix_tuning_refuses_gradient_checkpointing(make_recipe):
    path = make_recipe(adapter={"kind": "prefix"}, train={"gradient_checkpointing": True})
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "adapter.kind: prefix tuning cannot run with gradient checkpointing (PEFT's cached "
        "prefix key/values do not survive recomputation); set train.gradient_checkpointing: false"
    ]


@pytest.mark.parametrize(
    "adapter, model, message",
    [
        ({"kind": "prefix", "r": 8}, {}, "adapter.r: applies to kind lora only, not prefix; remove it"),
        ({"kind": "full"}, {"quantization": "4bit"}, "model.quantization: a quantized base trains through LoRA adapters only"),
        ({"kind": "freeze"}, {}, "adapter.kind: freeze needs adapter.trainable patterns"),
    ],
)
def test_impossible_combinations_are_refused(adapter, model, message, make_recipe, tiny_model_dir):
    path = make_recipe(adapter=adapter, model={"name": str(tiny_model_dir), **model})
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def result_recipe(result):
    from llmtune.recipe import load_recipe as load

    return load(result.run.path / "recipe.resolved.yaml")[0]
