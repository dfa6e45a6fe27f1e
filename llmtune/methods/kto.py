"""Kahneman-Tversky optimisation through TRL's KTOTrainer on answers marked desirable or not.

Rows are `feedback` (prompt, completion, label), or `preference` pairs that llmtune.data splits in
two (chosen desirable, rejected not) and reshuffles: KTOTrainer reads its rows in order, and each
row's neighbour in the batch gives its KL-term completion, so batches should mix prompts and labels.

The reference is TRL's choice: under a PEFT adapter TRL adds a frozen copy of the starting adapter
(named `ref`; for a fresh LoRA the same as the base) and runs the reference through it, so no second
model is held; final/ and checkpoints carry it in a `ref/` subfolder. With whole weights training,
TRL loads a frozen copy of the base from the model's own path.

Held out: the sum log-probability of each completion given its prompt, rendered with the chat
template as in training; `margin` is the mean over desirable completions minus the mean over
undesirable ones (it rises as the model learns the labels).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmtune.recipe.section import Section

KIND = "kto"
DESCRIPTION = (
    "Kahneman-Tversky optimisation on answers marked desirable or not (feedback rows, or preference "
    "pairs split in two), against a frozen reference"
)
FORMATS = ("feedback", "preference")
EXAMPLES = "feedback"
MODEL = "causal_lm"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
PACKING_AND_STREAMING = False


class Options(Section):
    """Kahneman-Tversky optimisation (TRL's KTOTrainer)."""

    beta: float = Field(default=0.1, gt=0)
    """Strength of the implicit KL constraint to the reference (lower: further from it)."""
    desirable_weight: float = Field(default=1.0, gt=0)
    """Weight of the desirable answers' loss; with unequal counts, TRL warns with a recommended range."""
    undesirable_weight: float = Field(default=1.0, gt=0)
    """Weight of the undesirable answers' loss."""
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """`kto` (the paper's, with the batch-level KL estimate) or `apo_zero_unpaired` (anchored: no KL term)."""


OPTIONS = Options


def _kl_term_needs_two_rows(recipe) -> list[str]:
    # TRL estimates the KL term from each row's neighbour within a device batch (a ValueError at train time).
    if recipe.method.kto.loss_type == "kto" and recipe.train.batch_size < 2:
        return [
            "train.batch_size: kto estimates its KL term from the other rows of each batch, so it needs at least 2; "
            "raise it (or set method.kto.loss_type: apo_zero_unpaired)"
        ]
    return []


def _no_adapter_on_the_lm_head(recipe) -> list[str]:
    targets = recipe.adapter.target_modules
    if recipe.adapter.kind in ("lora", "ia3") and isinstance(targets, list) and "lm_head" in targets:
        return [
            "adapter.target_modules: kto reads log-probabilities from lm_head's own weight, so an adapter on "
            "lm_head would never train; remove lm_head"
        ]
    return []


RULES = (_kl_term_needs_two_rows, _no_adapter_on_the_lm_head)


def memory_terms(shape) -> dict[str, float]:
    # One backward pass over batch_size rows; the KL-term rows and the reference pass run without gradients.
    terms = {"logits and loss": shape.logits(shape.batch_size)}
    if shape.whole:
        terms["frozen reference model"] = shape.frozen_copy()
    else:  # the reference is a frozen copy of the adapter (fp32, like the trained one)
        terms["reference adapter"] = shape.trainable_params * 4
    return terms


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place with KTO; returns (trainer, TrainOutput)."""
    from trl import KTOConfig, KTOTrainer

    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    cfg = recipe.method.kto
    # KTOConfig keeps TRL's sequential sampling (its KL term pairs neighbouring rows): the order is
    # llmtune.data's seeded shuffle.
    args = KTOConfig(
        **training_arguments(recipe, run, precision),
        max_length=recipe.data.max_length,
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        loss_type=cfg.loss_type,
        disable_dropout=True,
    )
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        callbacks=[run.callback(recipe.train.save_total_limit)],
    )
    return trainer, run_trainer(trainer, resume_from)


def evaluates(recipe, data) -> bool:
    return bool(data.eval_rows)


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    """Mean log p(completion | prompt) of the held-out desirable and undesirable answers, and their margin."""
    rows = data.eval_rows
    logps = completion_logprobs(
        model, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], recipe.data.chat_template
    )
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    result = {"n": len(rows)}
    if good:
        result["logp_desirable"] = round(sum(good) / len(good), 4)
    if bad:  # as a negative log-likelihood, so that higher is better for every figure
        result["nll_undesirable"] = round(-sum(bad) / len(bad), 4)
    if good and bad:
        result["margin"] = round(result["logp_desirable"] + result["nll_undesirable"], 4)
        print(
            f"[llmtune] held-out log-prob margin, desirable minus undesirable answers: {result['margin']:.3f} "
            f"({len(good)} and {len(bad)} rows) {when} training"
        )
    return result


def completion_logprobs(
    model, tokenizer, prompts: list, completions: list, chat_template: str, batch_size: int = 16
) -> list[float]:
    """Sum of log p(token) over each completion's tokens given its prompt, rendered as llmtune.data
    renders the conversation for training (the completion includes the template's end-of-turn)."""
    from llmtune.data.template import tokenize_example
    from llmtune.methods.trainers.pairs import held_out_answer_logprobs

    rows = [tokenize_example(p + c, tokenizer, chat_template) for p, c in zip(prompts, completions)]
    return held_out_answer_logprobs(model, rows, tokenizer.pad_token_id, batch_size)[0]


def training_figures(run) -> dict:
    return {}
