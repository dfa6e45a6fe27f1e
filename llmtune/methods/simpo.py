"""Simple preference optimisation (SimPO): the length-normalised log-probability margin of the
chosen answer over the rejected one, with a target margin and no reference model.

    loss = -mean log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma)

(Meng et al. 2024, Eq. 6; TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 is the same
loss.) The trainer is ORPO's (llmtune/methods/trainers/pairs.py, on transformers' Trainer): TRL
1.16 has SimPO only in trl.experimental, whose tokenization differs from the rest of llmtune.
Nothing but the trained model is held in memory: no reference, no adapter-disabled pass.

Held out: per pair, the mean per-token log-probability of the chosen answer minus the rejected
one's: `accuracy` (share of pairs above 0), `margin` (its mean), `logp_margin` (summed log-probs).
"""

from __future__ import annotations

from pydantic import Field

from llmtune.recipe.section import Section

KIND = "simpo"
DESCRIPTION = (
    "simple preference optimisation on preference pairs: a length-normalised log-prob margin with a target, no reference"
)
FORMATS = ("preference",)
EXAMPLES = "preference"
MODEL = "causal_lm"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
PACKING_AND_STREAMING = False


class Options(Section):
    """Simple preference optimisation (no reference model)."""

    beta: float = Field(default=2.0, gt=0)
    """Scale of the length-normalised reward (the paper uses 2 to 2.5)."""
    gamma: float = Field(default=0.5, ge=0)
    """Target reward margin between the chosen and the rejected answer."""


OPTIONS = Options
RULES = ()


def memory_terms(shape) -> dict[str, float]:
    # Chosen and rejected go through the model as one batch of 2 x batch_size rows; nothing else is held.
    return {
        "activations of the rejected responses": shape.activations(shape.batch_size),
        "logits and loss (chosen and rejected)": shape.logits(2 * shape.batch_size),
    }


def simpo_loss(beta: float, gamma: float):
    import torch.nn.functional as F

    def loss(chosen, rejected, chosen_nll):
        return -F.logsigmoid(beta * (chosen - rejected) - gamma).mean(), {}

    return loss


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place with SimPO; returns (trainer, TrainOutput)."""
    from llmtune.methods.trainers.pairs import train_pairs

    cfg = recipe.method.simpo
    return train_pairs(recipe, run, model, tokenizer, data, precision, resume_from, simpo_loss(cfg.beta, cfg.gamma), cfg.beta)


def evaluates(recipe, data) -> bool:
    return bool(data.eval_rows)


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    """The held-out pairs' length-normalised log-prob margin of chosen over rejected answers."""
    from llmtune.methods.trainers.pairs import evaluate_pairs

    return evaluate_pairs(recipe, model, tokenizer, data.eval_rows, when)


def training_figures(run) -> dict:
    return {}
