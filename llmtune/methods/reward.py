"""Reward modelling through TRL's RewardTrainer on preference pairs (Bradley-Terry loss).

The model is the base with a new one-output sequence-classification head (`score`); under LoRA,
PEFT's SEQ_CLS task trains and saves the head beside the adapters (modules_to_save). final/ is
always a full AutoModelForSequenceClassification(num_labels=1): adapters are merged before saving,
so PPO, evaluation and users load it with plain transformers.

Held-out figures (TRL's own metrics, averaged over the held-out pairs): `accuracy`, the share of
pairs where the chosen response scores above the rejected one, and `margin`, the mean of
score(chosen) - score(rejected).
"""

from __future__ import annotations

from llmtune.methods import run_trainer, training_arguments
from llmtune.models.load import Precision
from llmtune.recipe import Recipe
from llmtune.runs import RunCallback, RunDir, is_main_process


def train_reward(recipe: Recipe, run: RunDir, model, tokenizer, data, precision: Precision, resume_from: str | None):
    """Train `model` (a 1-label sequence classifier) in place; returns (trainer, TrainOutput)."""
    from trl import RewardConfig

    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**training_arguments(recipe, run, precision), max_length=recipe.data.max_length,
                        center_rewards_coefficient=recipe.method.reward.center_rewards_coefficient,
                        disable_dropout=True)
    trainer = _merging_reward_trainer()(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                        processing_class=tokenizer, callbacks=[RunCallback(run, recipe.train.save_total_limit)])
    output = run_trainer(trainer, resume_from)
    if data.eval is not None and is_main_process():
        metrics = trainer.evaluate()
        run.write_json("eval/after.json", {"accuracy": round(metrics["eval_accuracy"], 4),
                                           "margin": round(metrics["eval_margin"], 4), "n": len(data.eval)})
    return trainer, output


def _merging_reward_trainer():
    from trl import RewardTrainer

    class MergingRewardTrainer(RewardTrainer):
        """Saves final/ as a full sequence classifier: PEFT adapters (and the head) merged into the base."""

        def save_model(self, output_dir=None, _internal_call=False):
            model = self.accelerator.unwrap_model(self.model)
            if _internal_call or not hasattr(model, "merge_and_unload"):
                return super().save_model(output_dir, _internal_call)
            import copy

            # merge into a copy: the trained PEFT model stays usable in memory (e.g. by a later stage)
            merged = copy.deepcopy(model).merge_and_unload()
            if self.args.should_save:
                merged.save_pretrained(output_dir)
                self.processing_class.save_pretrained(output_dir)

    return MergingRewardTrainer
