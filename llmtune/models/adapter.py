"""Which parameters train: PEFT adapters (LoRA, DoRA, QLoRA, prefix, prompt, IA3), a frozen
part of the base, or every weight."""

from __future__ import annotations

import re

from llmtune.errors import UserError
from llmtune.recipe.schema import AdapterSection


def apply_adapter(
    model, cfg: AdapterSection, task: str = "CAUSAL_LM", tokenizer_path: str | None = None, gradient_checkpointing: bool = False
):
    """Wrap or freeze `model` for training as the adapter section says; returns the model to train.

    `task` is PEFT's task type: `CAUSAL_LM`, or `SEQ_CLS` when a new classification head trains
    (PEFT then trains and saves the head beside any adapter by itself).
    """
    if cfg.kind == "full":
        model.requires_grad_(True)
        return model
    if cfg.kind == "freeze":
        return _freeze(model, cfg, task)
    import peft

    if gradient_checkpointing:
        # Recomputed blocks need an input that requires grad, or a frozen base gets no adapter grads.
        model.enable_input_require_grads()
    # Not peft.prepare_model_for_kbit_training: with bitsandbytes 0.50 on CPU it rewrites the packed
    # 4/8-bit weights (measured: logits move by ~3e-3), so a reload of final/ onto a freshly
    # quantized base would no longer reproduce the trained model. Its other work (fp32 casts of
    # 16-bit norms) only matters with a 16-bit dtype, and norms then follow model.dtype.
    try:
        return peft.get_peft_model(model, _peft_config(cfg, model, task, tokenizer_path))
    except ValueError as exc:  # e.g. target_modules that match no module of this architecture
        raise UserError(f"adapter: PEFT cannot apply {cfg.kind} to this model: {str(exc).splitlines()[0]}") from None


# The attention projections' names in the Llama, Qwen2, Mistral, Gemma and Phi-3 families.
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _target_modules(cfg: AdapterSection, model, default):
    if cfg.target_modules != "attention":
        return cfg.target_modules or default
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if not set(ATTENTION_MODULES) & names:
        raise UserError(
            f"adapter.target_modules: this architecture has no {'/'.join(ATTENTION_MODULES)} modules; "
            "list its attention projections by name instead"
        )
    return [m for m in ATTENTION_MODULES if m in names]


def _peft_config(cfg: AdapterSection, model, task: str, tokenizer_path: str | None):
    import peft

    if cfg.kind == "lora":
        return peft.LoraConfig(
            task_type=task,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=_target_modules(cfg, model, "all-linear"),
            modules_to_save=cfg.modules_to_save or None,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
        )
    if cfg.kind == "ia3":
        return peft.IA3Config(
            task_type=task,
            target_modules=_target_modules(cfg, model, None),
            feedforward_modules=cfg.feedforward_modules,
            modules_to_save=cfg.modules_to_save or None,
        )
    if cfg.kind == "prefix":
        return peft.PrefixTuningConfig(
            task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=cfg.prefix_projection
        )
    if cfg.prompt_init_text:
        return peft.PromptTuningConfig(
            task_type=task,
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT,
            prompt_tuning_init_text=cfg.prompt_init_text,
            tokenizer_name_or_path=tokenizer_path,
        )
    return peft.PromptTuningConfig(
        task_type=task, num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=peft.PromptTuningInit.RANDOM
    )


def _freeze(model, cfg: AdapterSection, task: str):
    """Freeze by pattern, embeddings or first layers; a new classification head always trains."""
    names = [name for name, _ in model.named_parameters()]
    if cfg.trainable:
        patterns = [re.compile(p) for p in cfg.trainable]
        trainable = {n for n in names if any(p.search(n) for p in patterns)}
        if not trainable:
            raise UserError(
                f"adapter.trainable: no parameter name matches {cfg.trainable}; names look like {names[0]!r} ... {names[-1]!r}"
            )
    else:
        trainable = set(names)
        if cfg.freeze_embeddings:
            embedding_weights = {id(model.get_input_embeddings().weight)}
            trainable -= {n for n, p in model.named_parameters() if id(p) in embedding_weights}
        if cfg.freeze_layers:
            layers = _decoder_layers(model)
            if cfg.freeze_layers > len(layers):
                raise UserError(f"adapter.freeze_layers: the model has {len(layers)} layers; freeze at most that many")
            frozen = {id(p) for layer in layers[: cfg.freeze_layers] for p in layer.parameters()}
            trainable -= {n for n, p in model.named_parameters() if id(p) in frozen}
    if task == "SEQ_CLS":
        trainable |= {n for n in names if n.split(".")[0] in ("score", "classifier")}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return model


def _decoder_layers(model):
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise UserError("adapter.freeze_layers: cannot find this architecture's layer list; use adapter.trainable patterns")
    return layers


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared weights (tied embeddings) count once."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)  # 4-bit packs two values per byte
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
