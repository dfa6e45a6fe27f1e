"""Group relative policy optimisation through TRL's GRPOTrainer on prompts.

Rewards: Python functions named by import path (TRL's convention: fn(prompts=..., completions=...,
**columns) -> list of floats) and/or reward models (folders of 1-label sequence classifiers,
e.g. a reward run's final/), summed by TRL with equal weights. Under a PEFT adapter TRL's
reference is the policy with its adapters disabled.
"""

from __future__ import annotations

from llmtune.errors import UserError
from llmtune.methods import run_trainer, training_arguments
from llmtune.methods.ppo import load_function
from llmtune.models.load import Precision
from llmtune.recipe import Recipe
from llmtune.runs import RunCallback, RunDir


def train_grpo(recipe: Recipe, run: RunDir, model, tokenizer, data, precision: Precision, resume_from: str | None):
    """Train `model` in place with GRPO; returns (trainer, TrainOutput)."""
    from trl import GRPOConfig, GRPOTrainer

    cfg = recipe.method.grpo
    reward_funcs = [load_function(path, "method.grpo.reward_functions") for path in cfg.reward_functions]
    reward_funcs += [_reward_model(path, precision) for path in cfg.reward_models]
    if not reward_funcs:
        raise UserError("method.grpo: needs a reward: set reward_functions and/or reward_models (or reward_from_stage in a pipeline)")
    if recipe.train.batch_size % cfg.num_generations:
        raise UserError(f"train.batch_size: GRPO groups train.batch_size completions into groups of "
                        f"method.grpo.num_generations={cfg.num_generations}; make the batch size a multiple of it")
    args = GRPOConfig(**training_arguments(recipe, run, precision), num_generations=cfg.num_generations,
                      max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.beta,
                      epsilon=cfg.clip_range, loss_type=cfg.loss_type, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=data.train,
                          processing_class=tokenizer, callbacks=[RunCallback(run, recipe.train.save_total_limit)])
    return trainer, run_trainer(trainer, resume_from)


def _reward_model(path: str, precision: Precision):
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    if not Path(path).is_dir():
        raise UserError(f"method.grpo.reward_models: {path} is not a directory; give a reward run's final/ folder")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=precision.dtype)
