"""Odds-ratio preference optimisation (ORPO): supervised fine-tuning on the chosen answers plus an
odds-ratio penalty on the rejected ones, with no reference model.

    loss = NLL(chosen answer tokens) - beta * mean log sigmoid(log odds(chosen) - log odds(rejected))

with odds(y) = p / (1 - p) of each answer's mean per-token probability (Hong et al. 2024, Eqs. 4-7;
beta is the paper's lambda). The trainer is ours (llmtune/methods/trainers/pairs.py, on
transformers' Trainer): TRL 1.16 has ORPO only in trl.experimental, whose tokenization differs from
the rest of llmtune and puts the NLL on the prompt tokens too. Nothing but the trained model is
held in memory: no reference, no adapter-disabled pass.

Held out: per pair, the mean per-token log-probability of the chosen answer minus the rejected
one's: `accuracy` (share of pairs above 0), `margin` (its mean), `logp_margin` (summed log-probs).
"""

from __future__ import annotations

from pydantic import Field

from llmtune.recipe.section import Section

KIND = "orpo"
DESCRIPTION = (
    "odds-ratio preference optimisation on preference pairs: SFT on the chosen answer plus an odds-ratio term, no reference"
)
FORMATS = ("preference",)
EXAMPLES = "preference"
MODEL = "causal_lm"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
PACKING_AND_STREAMING = False


class Options(Section):
    """Odds-ratio preference optimisation (no reference model)."""

    beta: float = Field(default=0.1, gt=0)
    """Weight of the odds-ratio term against the chosen answers' NLL (the paper's lambda)."""


OPTIONS = Options
RULES = ()


def memory_terms(shape) -> dict[str, float]:
    # Chosen and rejected go through the model as one batch of 2 x batch_size rows; nothing else is held.
    return {
        "activations of the rejected responses": shape.activations(shape.batch_size),
        "logits and loss (chosen and rejected)": shape.logits(2 * shape.batch_size),
    }


def orpo_loss(beta: float):
    import torch.nn.functional as F

    from llmtune.methods.trainers.pairs import log1mexp

    def loss(chosen, rejected, chosen_nll):
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        return chosen_nll - beta * ratio.mean(), {
            "nll_loss": chosen_nll.detach(),
            "log_odds_ratio": ratio.detach().mean(),
            "log_odds_chosen": log_odds.detach().mean(),
        }

    return loss


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place with ORPO; returns (trainer, TrainOutput)."""
    from llmtune.methods.trainers.pairs import train_pairs

    beta = recipe.method.orpo.beta
    return train_pairs(recipe, run, model, tokenizer, data, precision, resume_from, orpo_loss(beta), beta)


def evaluates(recipe, data) -> bool:
    return bool(data.eval_rows)


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    """The held-out pairs' length-normalised log-prob margin of chosen over rejected answers."""
    from llmtune.methods.trainers.pairs import evaluate_pairs

    return evaluate_pairs(recipe, model, tokenizer, data.eval_rows, when)


def training_figures(run) -> dict:
    return {}
