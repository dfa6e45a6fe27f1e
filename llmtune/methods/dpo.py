"""Direct preference optimisation through TRL's DPOTrainer on preference pairs.

The reference is TRL's choice, which is the one we want: under a PEFT adapter it is the same
model with the adapters disabled (no second copy in memory); with whole weights training, TRL
loads a frozen copy of the base from the model's own path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmtune.recipe.section import Section

KIND = "dpo"
DESCRIPTION = "direct preference optimisation on preference pairs, against a frozen reference"
FORMATS = ("preference",)
EXAMPLES = "preference"
MODEL = "causal_lm"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
PACKING_AND_STREAMING = False


class Options(Section):
    """Direct preference optimisation (TRL's DPOTrainer)."""

    beta: float = Field(default=0.1, gt=0)
    """Strength of the implicit KL constraint to the reference (lower: further from it)."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """DPO loss variant (TRL's names): `sigmoid` is the paper's."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Assumed share of flipped preference labels (conservative / robust DPO)."""


OPTIONS = Options
RULES = ()


def memory_terms(shape) -> dict[str, float]:
    # Chosen and rejected go through the policy (and the reference) as one batch of 2 x batch_size rows.
    terms = {
        "activations of the rejected responses": shape.activations(shape.batch_size),
        "logits and loss (chosen and rejected)": shape.logits(2 * shape.batch_size),
    }
    if shape.whole:  # with an adapter the reference is the policy with its adapters disabled
        terms["frozen reference model"] = shape.frozen_copy()
    return terms


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place with DPO; returns (trainer, TrainOutput)."""
    from trl import DPOConfig, DPOTrainer

    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    cfg = recipe.method.dpo
    args = DPOConfig(
        **training_arguments(recipe, run, precision),
        max_length=recipe.data.max_length,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        disable_dropout=True,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        callbacks=[run.callback(recipe.train.save_total_limit)],
    )
    return trainer, run_trainer(trainer, resume_from)


def evaluates(recipe, data) -> bool:
    return False  # TRL logs the implicit rewards' accuracy and margins to metrics.jsonl


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    raise NotImplementedError("dpo reports its implicit reward figures in metrics.jsonl")


def training_figures(run) -> dict:
    return {}
