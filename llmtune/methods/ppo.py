"""RLHF with PPO on prompts: llmtune's own trainer on Accelerate (llmtune/methods/trainers/ppo.py
says how one step goes and why), since TRL removed its PPOTrainer in 1.13.

Held out: the reward-model score of greedy responses to the held-out prompts and the KL to the
reference, measured by the trainer before and after training (eval/reward_{before,after}.json).
"""

from __future__ import annotations

from pydantic import Field

from llmtune.errors import UserError
from llmtune.recipe.section import Section

KIND = "ppo"
DESCRIPTION = "RLHF with PPO on prompts: rollouts, a reward model and/or function, KL to the reference, GAE"
FORMATS = ("prompt_only", "preference")  # preference rows give their prompts
EXAMPLES = "prompt"
MODEL = "causal_lm"  # plus a scalar value head the trainer adds on the last hidden state
# Rollouts call generate() on the unwrapped policy, which needs whole weights on every rank.
WHOLE_WEIGHTS_PER_RANK = True
REWARD_MODEL_KEY = "reward_model"
PACKING_AND_STREAMING = False


class Options(Section):
    """PPO (ours, on Accelerate): rollouts from the policy, rewards, KL penalty, GAE, clipped updates."""

    reward_model: str | None = None
    """Folder of a reward model (AutoModelForSequenceClassification, 1 label), e.g. a reward run's final/."""
    reward_function: str | None = None
    """Python reward function `package.module:function`, called as fn(prompts=..., completions=...) -> floats
    (TRL's GRPO convention); its output is added to the reward model's score."""
    max_new_tokens: int = Field(default=32, gt=0)
    """Longest sampled response per prompt."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the rollouts (log-probabilities are taken at the same temperature)."""
    mini_batch_size: int = Field(default=4, gt=0)
    """Responses per PPO update; each rollout batch (train.batch_size prompts) is split into these."""
    ppo_epochs: int = Field(default=4, gt=0)
    """Passes over each rollout batch."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """GAE discount."""
    lam: float = Field(default=0.95, ge=0, le=1)
    """GAE lambda (bias/variance trade-off of the advantages)."""
    clip_range: float = Field(default=0.2, gt=0)
    """Policy ratio clipping: updates move pi/pi_old at most this far from 1 per rollout."""
    clip_range_value: float = Field(default=0.2, gt=0)
    """Value clipping around the rollout's values."""
    vf_coef: float = Field(default=0.1, ge=0)
    """Weight of the value loss (the value head shares the policy's trunk)."""
    kl_coef: float = Field(default=0.05, ge=0)
    """Per-token KL penalty coefficient against the reference (initial value when adaptive)."""
    kl_target: float | None = Field(default=None, gt=0)
    """Adaptive KL controller: keep the per-response KL near this value; unset: fixed kl_coef."""
    kl_horizon: int = Field(default=10000, gt=0)
    """Adaptive KL controller horizon, in responses."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance per rollout batch before GAE."""
    missing_eos_penalty: float = Field(default=0.0, ge=0)
    """Subtracted from the score of a response cut at max_new_tokens without EOS."""
    overlong_after: int | None = Field(default=None, gt=0)
    """Responses longer than this many tokens lose overlong_penalty per extra token."""
    overlong_penalty: float = Field(default=0.0, ge=0)
    """Penalty per token beyond overlong_after."""


OPTIONS = Options


def _needs_a_reward(recipe) -> list[str]:
    ppo = recipe.method.ppo
    if not (ppo.reward_model or ppo.reward_function) and not recipe.stages:
        return [
            "method.ppo: needs a reward: set reward_model (a folder) and/or reward_function "
            "(or reward_from_stage in a pipeline stage)"
        ]
    return []


def _mini_batch_fits_the_rollout(recipe) -> list[str]:
    if recipe.method.ppo.mini_batch_size > recipe.train.batch_size:
        return [
            f"method.ppo.mini_batch_size: {recipe.method.ppo.mini_batch_size} is larger than the rollout "
            f"batch (train.batch_size={recipe.train.batch_size}); lower it"
        ]
    return []


def _no_gradient_accumulation(recipe) -> list[str]:
    if recipe.train.grad_accum != 1:
        return ["train.grad_accum: PPO takes one optimizer step per mini-batch; set method.ppo.mini_batch_size instead"]
    return []


RULES = (_mini_batch_fits_the_rollout, _needs_a_reward, _no_gradient_accumulation)


def memory_terms(shape) -> dict[str, float]:
    ppo = shape.recipe.method.ppo
    hidden = shape.config.hidden_size
    terms = {
        "value head": (hidden + 1) * 4 * 4,  # fp32 weights, gradients and two Adam moments
        # An update scores mini_batch_size responses of prompt + max_new_tokens tokens.
        "logits and loss": shape.logits(ppo.mini_batch_size),
        # The rollout's KV cache: keys and values of every layer for the whole batch.
        "generation KV cache": shape.kv_cache(shape.batch_size),
    }
    if shape.whole:  # under an adapter the reference is the policy with its adapters disabled
        terms["frozen reference model"] = shape.frozen_copy()
    terms["reward model"] = shape.other_model(ppo.reward_model)
    return terms


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place with PPO on the prompts of `data.train`; returns (trainer, PPOOutput)."""
    from llmtune.distributed import is_main_process
    from llmtune.methods.trainers.ppo import PPOTrainer

    cfg = recipe.method.ppo
    if not (cfg.reward_model or cfg.reward_function):
        raise UserError("method.ppo: needs a reward: set reward_model (a folder, or from_stage) and/or reward_function")
    tokenizer.padding_side = "left"
    trainer = PPOTrainer(recipe, run, model, tokenizer, list(data.train["prompt"]), precision)
    held_out = list(data.eval["prompt"]) if getattr(data, "eval", None) is not None else []
    if held_out:
        from accelerate.utils import broadcast_object_list

        # A resumed run keeps its "before" figures; rank 0 reads them and tells the others (all ranks score, or none).
        before = broadcast_object_list([run.read_json("eval/reward_before.json") if is_main_process() else None])[0]
        before = before or trainer.held_out_reward(held_out, recipe.train.seed, cfg.mini_batch_size)
        if is_main_process():
            run.write_json("eval/reward_before.json", before)
    output = trainer.train(resume_from)
    if held_out:
        after = trainer.held_out_reward(held_out, recipe.train.seed, cfg.mini_batch_size)
        if is_main_process():
            run.write_json("eval/reward_after.json", after)
    return trainer, output


def evaluates(recipe, data) -> bool:
    return False  # the trainer scores held-out prompts itself (training_figures)


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    raise NotImplementedError("ppo is measured during training (training_figures)")


def training_figures(run) -> dict:
    after = run.read_json("eval/reward_after.json")
    if not after:
        return {}
    before = run.read_json("eval/reward_before.json")
    print(
        f"[llmtune] held-out reward {before['reward_mean']:.4f} -> {after['reward_mean']:.4f}, "
        f"KL to the reference {after['kl']:.3f}"
    )
    return {"before": before, "after": after}
