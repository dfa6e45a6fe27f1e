"""`llmtune plan`: counts from the empty-weights model, the memory maths by hand, activations against
what autograd really saves, and the warning before a launch that will not fit."""

import json

import pytest
import torch

from llmtune.launch import LaunchOptions, shipped_configs
from llmtune.models.adapter import apply_adapter, count_parameters
from llmtune.plan import estimate_memory, format_plan, launch_shape, warn_if_it_will_not_fit
from llmtune.recipe import load_recipe


def plan_for(make_recipe, *overrides, config=None, processes=None, device="cpu", **sections):
    recipe, _ = load_recipe(make_recipe(**sections), list(overrides))
    options = LaunchOptions(config=shipped_configs()[config], num_processes=processes) if config else None
    return estimate_memory(recipe, options, device=device)


@pytest.mark.parametrize(
    "adapter",
    [
        {"kind": "lora", "r": 4, "alpha": 8},
        {"kind": "lora", "r": 4, "use_dora": True},
        {"kind": "full"},
        {"kind": "freeze", "freeze_layers": 1},
        {"kind": "prefix", "num_virtual_tokens": 5},
        {"kind": "prompt", "num_virtual_tokens": 5},
        {"kind": "ia3"},
    ],
)
def test_counts_equal_the_real_model_with_its_adapter(make_recipe, tiny_model_dir, adapter):
    """The empty-weights model counts exactly what loading the weights and applying the adapter counts."""
    from transformers import AutoModelForCausalLM

    from llmtune.recipe.schema import AdapterSection

    plan = plan_for(make_recipe, adapter=adapter)
    real = apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), AdapterSection(**adapter))
    assert (plan.trainable_params, plan.total_params) == count_parameters(real)
    assert 0 < plan.trainable_params <= plan.total_params


def test_full_finetune_bytes_by_hand(make_recipe):
    """fp32 AdamW, one process: 4 bytes of weight, 4 of gradient, 8 of moments per parameter."""
    plan = plan_for(make_recipe, adapter={"kind": "full"})
    p = plan.total_params
    assert plan.gpu["parameters"] == 4 * p and plan.gpu["gradients"] == 4 * p and plan.gpu["optimizer states"] == 8 * p
    assert plan.peak_bytes == sum(plan.gpu.values())
    ddp = plan_for(make_recipe, adapter={"kind": "full"}, config="multi_gpu", processes=2)
    assert ddp.gpu["DDP gradient buckets"] == 4 * p and ddp.gpu["parameters"] == 4 * p


def test_zero_stages_shard_what_the_zero_paper_says(make_recipe):
    full = {"adapter": {"kind": "full"}}
    n = 4
    single = plan_for(make_recipe, **full)
    z1 = plan_for(make_recipe, config="deepspeed_zero1", processes=n, **full)
    z2 = plan_for(make_recipe, config="deepspeed_zero2", processes=n, **full)
    z3 = plan_for(make_recipe, config="deepspeed_zero3", processes=n, **full)
    assert z1.launch.zero_stage == 1 and z3.launch.describe() == "DeepSpeed ZeRO-3 x 4"
    assert z1.gpu["optimizer states"] == single.gpu["optimizer states"] / n  # fp32: moments only, sharded
    assert z1.gpu["gradients"] == single.gpu["gradients"] and z2.gpu["gradients"] == single.gpu["gradients"] / n
    assert z2.gpu["parameters"] == single.gpu["parameters"] and z3.gpu["parameters"] == single.gpu["parameters"] / n
    assert "gathered layers (ZeRO-3)" in z3.gpu
    # bf16 on GPUs: 2 + 2 + 12 bytes per parameter before sharding (fp32 master weights in the optimizer).
    gpu = plan_for(make_recipe, config="deepspeed_zero1", processes=1, device="cuda", **full)
    p = gpu.total_params
    assert (gpu.gpu["parameters"], gpu.gpu["gradients"], gpu.gpu["optimizer states"]) == (2 * p, 2 * p, 12 * p)
    offload = plan_for(make_recipe, config="deepspeed_zero3_offload", processes=n, **full)
    assert offload.gpu["optimizer states"] == 0 and offload.gpu["parameters"] == 0
    assert offload.cpu_offload == pytest.approx(z3.gpu["optimizer states"] * n + z3.gpu["parameters"] * n)
    fsdp = plan_for(make_recipe, config="fsdp2", processes=n, **full)
    assert (
        fsdp.gpu["parameters"] == single.gpu["parameters"] / n
        and fsdp.gpu["optimizer states"] == single.gpu["optimizer states"] / n
    )


def test_batch_checkpointing_and_quantization_move_the_right_rows(make_recipe):
    base = plan_for(make_recipe, "train.batch_size=4")
    double = plan_for(make_recipe, "train.batch_size=8")
    assert double.gpu["activations"] == pytest.approx(2 * base.gpu["activations"])
    assert double.gpu["parameters"] == base.gpu["parameters"]
    checkpointed = plan_for(make_recipe, "train.batch_size=4", "train.gradient_checkpointing=true")
    assert checkpointed.gpu["activations"] < base.gpu["activations"]
    qlora = plan_for(make_recipe, "model.quantization=4bit", device="cuda")
    bf16 = plan_for(make_recipe, device="cuda")
    assert qlora.gpu["parameters"] < bf16.gpu["parameters"] and qlora.trainable_params == bf16.trainable_params


def test_activation_estimate_is_close_to_what_autograd_saves(make_recipe, tiny_model_dir):
    """The formula against the tensors autograd really keeps for backward (weights excluded)."""
    from transformers import AutoModelForCausalLM

    plan = plan_for(make_recipe, "train.batch_size=4", adapter={"kind": "full"})
    b, s, _ = plan.batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    vocab = model.config.vocab_size

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and (t.dim() == 0 or t.shape[-1] != vocab):  # logits: estimated apart
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(3, vocab, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    measured = sum(saved.values())
    assert 0.7 < plan.gpu["activations"] / measured < 1.4, (plan.gpu["activations"], measured)


def test_launch_shape_reads_configs(make_recipe, tmp_path):
    assert launch_shape(None).kind == "single"
    shape = launch_shape(LaunchOptions(config=shipped_configs()["deepspeed_zero2_offload"], num_processes=8))
    assert (shape.kind, shape.processes, shape.zero_stage, shape.offload_optimizer, shape.offload_params) == (
        "deepspeed",
        8,
        2,
        True,
        False,
    )
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    own = tmp_path / "own.yaml"
    own.write_text(f"distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n  deepspeed_config_file: {ds_json}\n")
    shape = launch_shape(LaunchOptions(config=own))
    assert (shape.zero_stage, shape.processes, shape.offload_params, shape.offload_optimizer) == (3, 4, True, False)


def test_warning_before_launch_when_it_will_not_fit(make_recipe, monkeypatch, capsys):
    import llmtune.plan as plan_module

    recipe, _ = load_recipe(make_recipe(), [])
    monkeypatch.setattr(plan_module, "visible_gpu_memory", lambda: None)
    assert warn_if_it_will_not_fit(recipe, None) is None  # no GPU: nothing to check against
    monkeypatch.setattr(plan_module, "visible_gpu_memory", lambda: 1e6)  # a 1 MB "GPU"
    plan = warn_if_it_will_not_fit(recipe, None)
    assert plan is not None and plan.fits(1e6) is False
    assert "warning: this run needs about" in capsys.readouterr().err
    monkeypatch.setattr(plan_module, "visible_gpu_memory", lambda: 80e9)
    warn_if_it_will_not_fit(recipe, None)
    assert "warning" not in capsys.readouterr().err
    assert "DOES NOT FIT in 0.0 GB" in format_plan(plan, 1e6)


def test_plan_cli_prints_a_table_and_json(make_recipe, capsys):
    from llmtune.cli import main

    path = make_recipe()
    assert main(["plan", str(path), "--accelerate-config", "deepspeed_zero3", "--num-processes", "2", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed ZeRO-3 x 2" in out and "estimated peak" in out and "fits in 80.0 GB" in out
    assert main(["plan", str(path), "--json", "--device", "cuda"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] == sum(data["per_gpu_bytes"].values()) and data["device"] == "cuda"
