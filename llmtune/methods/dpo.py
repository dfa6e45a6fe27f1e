"""Direct preference optimisation through TRL's DPOTrainer on preference pairs.

The reference is TRL's choice, which is the one we want: under a PEFT adapter it is the same
model with the adapters disabled (no second copy in memory); with whole weights training, TRL
loads a frozen copy of the base from the model's own path.
"""

from __future__ import annotations

from llmtune.methods import run_trainer, training_arguments
from llmtune.models.load import Precision
from llmtune.recipe import Recipe
from llmtune.runs import RunCallback, RunDir


def train_dpo(recipe: Recipe, run: RunDir, model, tokenizer, data, precision: Precision, resume_from: str | None):
    """Train `model` in place with DPO; returns (trainer, TrainOutput)."""
    from trl import DPOConfig, DPOTrainer

    cfg = recipe.method.dpo
    args = DPOConfig(**training_arguments(recipe, run, precision), max_length=recipe.data.max_length,
                     beta=cfg.beta, loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing, disable_dropout=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer,
                         callbacks=[RunCallback(run, recipe.train.save_total_limit)])
    return trainer, run_trainer(trainer, resume_from)
