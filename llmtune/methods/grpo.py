"""Group relative policy optimisation through TRL's GRPOTrainer on prompts.

Rewards: Python functions named by import path (TRL's convention: fn(prompts=..., completions=...,
**columns) -> list of floats) and/or reward models (folders of 1-label sequence classifiers,
e.g. a reward run's final/), summed by TRL with equal weights. Under a PEFT adapter TRL's
reference is the policy with its adapters disabled.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmtune.errors import UserError
from llmtune.recipe.section import Section

KIND = "grpo"
DESCRIPTION = "group relative policy optimisation (RLHF) on prompts, scored by reward functions and/or models"
FORMATS = ("prompt_only", "preference")  # preference rows give their prompts
EXAMPLES = "prompt"
MODEL = "causal_lm"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = "reward_models"
PACKING_AND_STREAMING = False


class Options(Section):
    """Group relative policy optimisation (TRL's GRPOTrainer) on prompts."""

    reward_functions: list[str] = Field(default_factory=list)
    """Python reward functions `package.module:function` (fn(prompts=..., completions=..., **columns) -> floats)."""
    reward_models: list[str] = Field(default_factory=list)
    """Folders of reward models (1-label sequence classifiers, e.g. a reward run's final/)."""
    num_generations: int = Field(default=4, ge=2)
    """Completions sampled per prompt; advantages are relative within each group."""
    max_new_tokens: int = Field(default=64, gt=0)
    """Longest sampled completion."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature."""
    beta: float = Field(default=0.0, ge=0)
    """KL penalty to the reference (0, TRL's default, skips the reference forward pass)."""
    clip_range: float = Field(default=0.2, gt=0)
    """Ratio clipping epsilon."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """Token-loss normalisation (TRL's names)."""


OPTIONS = Options


def _needs_a_reward(recipe) -> list[str]:
    grpo = recipe.method.grpo
    if not (grpo.reward_functions or grpo.reward_models) and not recipe.stages:
        return [
            "method.grpo: needs a reward: set reward_functions and/or reward_models (or reward_from_stage in a pipeline stage)"
        ]
    return []


def _batch_holds_whole_groups(recipe) -> list[str]:
    n = recipe.method.grpo.num_generations
    if recipe.train.batch_size % n:
        return [
            f"train.batch_size: GRPO groups train.batch_size completions into groups of "
            f"method.grpo.num_generations={n}; make the batch size a multiple of it"
        ]
    return []


RULES = (_needs_a_reward, _batch_holds_whole_groups)


def memory_terms(shape) -> dict[str, float]:
    # batch_size completions (prompt + completion, within data.max_length) are scored per step.
    terms = {"logits and loss": shape.logits(shape.batch_size)}
    if shape.recipe.method.grpo.beta > 0 and shape.whole:  # beta 0 skips the reference; under an adapter it is the policy
        terms["frozen reference model"] = shape.frozen_copy()
    return terms


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place with GRPO; returns (trainer, TrainOutput)."""
    from trl import GRPOConfig, GRPOTrainer

    from llmtune.methods.trainers.hf import run_trainer, training_arguments
    from llmtune.methods.trainers.ppo import load_function

    cfg = recipe.method.grpo
    reward_funcs = [load_function(path, "method.grpo.reward_functions") for path in cfg.reward_functions]
    reward_funcs += [_reward_model(path, precision) for path in cfg.reward_models]
    if not reward_funcs:
        raise UserError(
            "method.grpo: needs a reward: set reward_functions and/or reward_models (or reward_from_stage in a pipeline)"
        )
    args = GRPOConfig(
        **training_arguments(recipe, run, precision),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        beta=cfg.beta,
        epsilon=cfg.clip_range,
        loss_type=cfg.loss_type,
        disable_dropout=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        callbacks=[run.callback(recipe.train.save_total_limit)],
    )
    return trainer, run_trainer(trainer, resume_from)


def evaluates(recipe, data) -> bool:
    return False  # TRL logs the rewards of every step's completions to metrics.jsonl


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    raise NotImplementedError("grpo reports its rewards in metrics.jsonl")


def training_figures(run) -> dict:
    return {}


def _reward_model(path: str, precision):
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification

    if not Path(path).is_dir():
        raise UserError(f"method.grpo.reward_models: {path} is not a directory; give a reward run's final/ folder")
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=precision.dtype)
