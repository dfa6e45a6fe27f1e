"""Knowledge distillation: the student (the recipe's model) learns the teacher's next-token distributions.

Two modes, on the same rows (input_ids + labels with the loss mask llmtune.data builds):

- `offline`: on the data's own responses. Both models read each row; the loss is the divergence between the
  teacher's and the student's next-token distributions at every response token (labels != -100), optionally mixed
  with the usual cross-entropy (`ce_weight`). Ours, on transformers' Trainer: TRL 1.16's DistillationTrainer has
  no offline mode (no lmbda, no cross-entropy term).
- `on_policy` (GKD, Agarwal et al. 2024): the student samples a completion for each row's prompt (its tokens
  before the first response token), the teacher scores it, and the loss is the same divergence over the sampled
  tokens. TRL's DistillationTrainer, given the prompts as token ids so they stay exactly as llmtune rendered them.

The divergence follows TRL's convention (trl.kernels.chunked_divergence): forward KL(teacher || student),
reverse KL(student || teacher), or the generalised Jensen-Shannon divergence
beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s, each on both models'
logits divided by `temperature`, averaged over the response tokens (no temperature^2 factor).

Teacher and student must share one vocabulary: a teacher whose vocabulary differs is refused before any
training step, with the key and the fix.

Held out: the token-mean KL(teacher || student) at temperature 1 over the response tokens of the held-out
rows (`kl_to_teacher`, lower is closer) and the share of those tokens where both models' most likely next token
agrees (`top1_agreement`), before (eval.before_after) and after training; plus exact match when the recipe has
an eval.exact_match section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmtune.errors import UserError
from llmtune.recipe.section import Section

KIND = "distill"
DESCRIPTION = "knowledge distillation: a teacher's next-token distributions on the data's responses or the student's own samples"
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
EXAMPLES = "lm"
MODEL = "causal_lm"
# The teacher is a plain module held whole by every rank (not prepared by DeepSpeed/FSDP, and under ZeRO-3 its
# from_pretrained would be partitioned); sharded runs are not supported until that is built and tested.
WHOLE_WEIGHTS_PER_RANK = True
REWARD_MODEL_KEY = None
PACKING_AND_STREAMING = False

DIVERGENCE_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0}  # TRL's beta for the two KL directions; jsd takes `beta`


class Options(Section):
    """Knowledge distillation from a teacher into the recipe's model (the student)."""

    teacher: str | None = None
    """Teacher model: a local folder (a full model, or an adapter folder such as an earlier run's final/), a built-in
    name (`llmtune ls`) or a hub id. It must use the student's vocabulary (same tokenizer)."""
    mode: Literal["offline", "on_policy"] = "offline"
    """`offline`: on the data's responses; `on_policy`: on completions the student samples for the data's prompts,
    scored by the teacher (GKD; TRL's DistillationTrainer)."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """Divergence per response token: `forward_kl`, the KL divergence of the student from the teacher (sum of
    p_teacher * log(p_teacher / p_student): mass-covering), `reverse_kl` (sum of p_student * log(p_student /
    p_teacher): mode-seeking), or `jsd`, the generalised Jensen-Shannon divergence with mixture weight `beta`."""
    beta: float = Field(default=0.5, gt=0, lt=1)
    """jsd only: the teacher's weight in the mixture m = beta * p_teacher + (1 - beta) * p_student (0.5: the
    symmetric JSD)."""
    temperature: float = Field(default=1.0, gt=0)
    """Both models' logits are divided by this before the divergence (on_policy: also the sampling temperature)."""
    ce_weight: float = Field(default=0.0, ge=0, le=1)
    """offline only: loss = (1 - ce_weight) * divergence + ce_weight * cross-entropy on the data's responses."""
    max_new_tokens: int = Field(default=64, gt=0)
    """on_policy only: longest sampled completion per prompt."""


OPTIONS = Options


def _needs_a_teacher(recipe) -> list[str]:
    if not recipe.method.distill.teacher:
        return [
            "method.distill.teacher: needs a teacher model; give a model folder, a built-in name such as "
            "smollm2-135m-instruct, or a hub id"
        ]
    return []


def _options_fit_the_mode_and_loss(recipe) -> list[str]:
    cfg, default = recipe.method.distill, Options()
    problems = []
    if cfg.loss != "jsd" and cfg.beta != default.beta:
        problems.append(f"method.distill.beta: applies to loss jsd only, not {cfg.loss}; remove it or set loss: jsd")
    if cfg.mode == "on_policy" and cfg.ce_weight:
        problems.append(
            "method.distill.ce_weight: applies to mode offline only (on_policy trains on the student's own samples, "
            "which have no reference answer); remove it or set mode: offline"
        )
    if cfg.mode == "offline" and cfg.max_new_tokens != default.max_new_tokens:
        problems.append(
            "method.distill.max_new_tokens: applies to mode on_policy only (offline trains on the data's responses); "
            "remove it or set mode: on_policy"
        )
    return problems


def _on_policy_needs_prompts(recipe) -> list[str]:
    if recipe.method.distill.mode != "on_policy":
        return []
    problems = [
        f"data.sources[{i}].format: on-policy distillation samples completions for the rows' prompts, and text rows "
        "have none; use a chat format (messages, sharegpt, alpaca, prompt_completion) or method.distill.mode: offline"
        for i, source in enumerate(recipe.data.sources)
        if source.format == "text"
    ]
    if recipe.adapter.kind in ("prefix", "prompt"):
        problems.append(
            f"adapter.kind: on-policy distillation (TRL's DistillationTrainer) calls the student's backbone directly, "
            f"so {recipe.adapter.kind} tuning's virtual tokens would be skipped; use lora (or full, freeze, ia3), or "
            "method.distill.mode: offline"
        )
    return problems


RULES = (_needs_a_teacher, _options_fit_the_mode_and_loss, _on_policy_needs_prompts)


def memory_terms(shape) -> dict[str, float]:
    cfg = shape.recipe.method.distill
    terms = {
        "logits and loss": shape.logits(shape.batch_size),
        "teacher logits": shape.logits(shape.batch_size),
        "teacher model": _teacher_bytes(shape),
    }
    if cfg.mode == "on_policy":
        terms["generation KV cache"] = shape.kv_cache(shape.batch_size)
    return terms


def _teacher_bytes(shape) -> float:
    """The teacher in the compute dtype, counted from its config; the student's size when the teacher is the
    student's own base, or when its config is not on this machine (a hub id not downloaded yet)."""
    from pathlib import Path

    teacher = shape.recipe.method.distill.teacher
    if not teacher or teacher == shape.recipe.model.name:
        return shape.frozen_copy()
    from llmtune.models.builtin import BUILTIN_MODELS, cache_root

    folder = cache_root() / "models" / teacher if teacher in BUILTIN_MODELS else Path(teacher).expanduser()
    if not (folder / "config.json").is_file():
        return shape.frozen_copy()
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return sum(p.numel() for p in model.parameters()) * shape.compute_bytes


# --- the loss ------------------------------------------------------------------------------------


def divergence(student_logits, teacher_logits, labels, beta: float, temperature: float = 1.0):
    """Per-token divergence between the teacher's and the student's next-token distributions at every position
    whose next token carries a label (labels[:, 1:] != -100); returns (sum over those tokens, their count).

    beta 0: forward KL(teacher || student); 1: reverse KL(student || teacher); between: the generalised JSD
    beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s (TRL's convention).
    """
    import math

    import torch
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    log_ps = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    if beta == 0.0:
        per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif beta == 1.0:
        per_token = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
        per_token = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return per_token.sum(), mask.sum()


def _beta(cfg) -> float:
    return cfg.beta if cfg.loss == "jsd" else DIVERGENCE_BETA[cfg.loss]


# --- the teacher ---------------------------------------------------------------------------------


def load_teacher(recipe, dtype, device):
    """The teacher, frozen and in eval mode on `device`; an adapter folder is merged into its base."""
    from pathlib import Path

    from llmtune.models.builtin import BUILTIN_MODELS, resolve_builtin

    name = recipe.method.distill.teacher
    if name in BUILTIN_MODELS:
        path = str(resolve_builtin(name))
    elif Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser())
    elif name.startswith((".", "/", "~")):
        raise UserError(
            f"method.distill.teacher: {name} is not a directory; give a model folder, a built-in name "
            f"({', '.join(BUILTIN_MODELS)}) or a hub id"
        )
    else:
        path = name  # a hub id
    try:
        if (Path(path) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            teacher = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
        else:
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, revision=None, trust_remote_code=recipe.model.trust_remote_code
            )
    except OSError as exc:
        raise UserError(
            f"method.distill.teacher: cannot load {name!r}: {str(exc).splitlines()[0]}\n"
            "  Give a local model folder, a built-in name (`llmtune ls`), or a hub id reachable from this machine."
        ) from None
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), path


def check_vocabulary(recipe, student, tokenizer, teacher, teacher_path: str) -> None:
    """Refuse a teacher whose next-token distributions are over another vocabulary than the student's."""
    student_size = student.config.get_text_config().vocab_size
    teacher_size = teacher.config.get_text_config().vocab_size
    fix = (
        "distillation compares the two next-token distributions token by token, so both models must use one "
        "tokenizer; give a teacher of the student's model family (or set model.name to a student of the teacher's)"
    )
    if student_size != teacher_size:
        raise UserError(
            f"method.distill.teacher: the teacher's vocabulary has {teacher_size} tokens and the student's "
            f"(model.name {recipe.model.name}) {student_size}; {fix}"
        )
    try:
        from transformers import AutoTokenizer

        teacher_vocab = AutoTokenizer.from_pretrained(teacher_path).get_vocab()
    except (OSError, ValueError):
        return  # no tokenizer beside the teacher's weights: the sizes are all there is to compare
    if teacher_vocab != tokenizer.get_vocab():
        raise UserError(
            f"method.distill.teacher: the teacher's tokenizer has the student's vocabulary size ({student_size}) "
            f"but other tokens; {fix}"
        )


def _teacher_for(recipe, model, tokenizer):
    from llmtune.models.load import resolve_precision

    teacher, path = load_teacher(recipe, resolve_precision(recipe.model.dtype).dtype, _device_of(model))
    check_vocabulary(recipe, model, tokenizer, teacher, path)
    return teacher


def _device_of(model):
    return next(model.parameters()).device


# --- held-out figures ----------------------------------------------------------------------------


def evaluates(recipe, data) -> bool:
    if recipe.eval.exact_match is not None and not data.eval_rows:
        from llmtune.data import describe_drops

        raise UserError(
            "eval.exact_match: no usable held-out rows (see the drop reasons in the data report)",
            describe_drops(data.stats["dropped"]),
        )
    return getattr(data, "eval", None) is not None or recipe.eval.exact_match is not None


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    """KL to the teacher and top-1 agreement on the held-out responses (and exact match when asked for)."""
    result: dict = {}
    if getattr(data, "eval", None) is not None:
        teacher = _teacher_for(recipe, model, tokenizer)
        result = kl_to_teacher(model, teacher, list(data.eval), tokenizer.pad_token_id, recipe.train.batch_size)
        del teacher
        print(
            f"[llmtune] held-out KL to the teacher {result['kl_to_teacher']:.4f} nats/token, top-1 agreement "
            f"{result['top1_agreement']:.1%} on {result['n']} rows {when} training"
        )
    if recipe.eval.exact_match is not None:
        from llmtune.evaluation.exact_match import exact_match

        matched = exact_match(
            model,
            tokenizer,
            data.eval_rows,
            recipe.eval.exact_match,
            recipe.data.chat_template,
            generations_path=run.path / "eval" / f"generations-{when}.jsonl",
            desc=f"exact match ({when})",
        )
        print(f"[llmtune] held-out exact match {matched['exact_match']:.1%} of {matched['n']} {when} training")
        result = result | matched
    return result


def kl_to_teacher(model, teacher, rows: list[dict], pad_token_id: int, batch_size: int = 8) -> dict:
    """Token-mean KL(teacher || student) at temperature 1 over the response tokens of `rows` (input_ids +
    labels), and the share of those tokens where both models' most likely next token is the same."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    total, tokens, agree = 0.0, 0, 0
    device = _device_of(model)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows[start : start + batch_size]])
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            teacher_logits = teacher(**inputs).logits
            student_logits = model(**inputs).logits[:, -teacher_logits.shape[1] :]  # prompt tuning prepends tokens
            kl, n = divergence(student_logits, teacher_logits, labels, beta=0.0)
            mask = labels[:, 1:] != -100
            same = student_logits[:, :-1].argmax(-1) == teacher_logits[:, :-1].argmax(-1)
            total, tokens, agree = total + kl.item(), tokens + int(n), agree + int(same[mask].sum())
    model.train(was_training)
    if not tokens:
        raise UserError("data.eval_sources: the held-out rows have no response tokens to compare with the teacher")
    print(f"[llmtune] compared with the teacher on {tokens} held-out response tokens")
    return {"n": len(rows), "kl_to_teacher": round(total / tokens, 4), "top1_agreement": round(agree / tokens, 4)}


def training_figures(run) -> dict:
    return {}


# --- training ------------------------------------------------------------------------------------


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` (the student) in place towards the teacher; returns (trainer, TrainOutput)."""
    from llmtune.evaluation.stage import periodic_callbacks
    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    cfg = recipe.method.distill
    teacher = _teacher_for(recipe, model, tokenizer)  # before any step: a teacher of another vocabulary stops here
    callbacks = [run.callback(recipe.train.save_total_limit), *periodic_callbacks(recipe, run, tokenizer, data)]
    if cfg.mode == "offline":
        from transformers import TrainingArguments
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer = _offline_trainer_class()(
            teacher=teacher,
            beta=_beta(cfg),
            temperature=cfg.temperature,
            ce_weight=cfg.ce_weight,
            model=model,
            args=TrainingArguments(**training_arguments(recipe, run, precision)),
            train_dataset=data.train,
            processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id),
            callbacks=callbacks,
        )
    else:
        from trl import DistillationConfig

        args = DistillationConfig(
            # TRL counts prompt and completion tokens itself (num_input_tokens_seen); the batches it is given
            # hold prompts only, which transformers' own counter cannot read.
            **training_arguments(recipe, run, precision) | {"include_num_input_tokens_seen": "no"},
            beta=_beta(cfg),
            temperature=cfg.temperature,
            max_completion_length=cfg.max_new_tokens,
        )
        trainer = _on_policy_trainer_class()(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=prompts_of(data.train),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    return trainer, run_trainer(trainer, resume_from)


def prompts_of(rows):
    """Each lm row's prompt: its tokens before the first one that carries loss (the rendered conversation up to
    and including the assistant header), as a `prompt` column of token ids."""
    import datasets

    prompts = []
    for input_ids, labels in zip(rows["input_ids"], rows["labels"]):
        first = next((i for i, label in enumerate(labels) if label != -100), None)
        if first:  # a row whose first token carries loss has no prompt to sample from
            prompts.append({"prompt": list(input_ids[:first])})
    if not prompts:
        raise UserError("data.sources: no row has a prompt before its response, so there is nothing to sample from")
    return datasets.Dataset.from_list(prompts)


def _offline_trainer_class():
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class OfflineDistillationTrainer(Trainer):
        """transformers' Trainer with the distillation loss on the data's response tokens.

        The loss is summed over response tokens and divided by `num_items_in_batch` (the response tokens of the
        whole accumulated batch, which the Trainer counts over labels[:, 1:]), so gradient accumulation averages
        over tokens exactly as one large batch would; it is already scaled for accumulation.
        """

        loss_is_scaled_for_ga = True

        def __init__(self, *args, teacher, beta, temperature, ce_weight, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.beta, self.temperature, self.ce_weight = teacher, beta, temperature, ce_weight

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            inputs["use_cache"] = False
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
            student_logits = outputs.logits[:, -teacher_logits.shape[1] :]  # prompt tuning prepends virtual tokens
            total, tokens = divergence(student_logits, teacher_logits, labels, self.beta, self.temperature)
            if self.ce_weight:
                ce = F.cross_entropy(
                    student_logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
                )
                total = (1 - self.ce_weight) * total + self.ce_weight * ce
            if num_items_in_batch is None:  # as one micro-batch of the accumulation
                loss = total / tokens.clamp(min=1) / self.current_gradient_accumulation_steps
            else:
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:  # num_items_in_batch counts every rank's tokens
                    loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return OfflineDistillationTrainer


def _on_policy_trainer_class():
    from trl import DistillationTrainer

    class TokenPromptDistillationTrainer(DistillationTrainer):
        """TRL's DistillationTrainer reading prompts that are already token ids (llmtune renders and masks rows
        itself), so generation starts from exactly the tokens the offline mode and the evaluation see."""

        def _tokenize_prompts(self, prompts):
            return [list(prompt) for prompt in prompts], None, {}

    return TokenPromptDistillationTrainer
