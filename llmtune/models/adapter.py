"""Which parameters train: LoRA adapters on a frozen base, or every weight."""

from __future__ import annotations

from llmtune.recipe.schema import AdapterSection


def apply_adapter(model, cfg: AdapterSection):
    """Wrap `model` for training as the adapter section says; returns the model to train."""
    if cfg.kind == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save or None,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )
    return get_peft_model(model, lora)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
