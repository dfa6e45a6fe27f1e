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

from pydantic import Field

from llmtune.recipe.section import Section

KIND = "reward"
DESCRIPTION = "a reward model (one-output score head) on preference pairs, Bradley-Terry loss"
FORMATS = ("preference",)
EXAMPLES = "preference"
MODEL = "sequence_classifier"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
PACKING_AND_STREAMING = False


class Options(Section):
    """Reward modelling (TRL's RewardTrainer): a 1-output head scoring prompt + response."""

    center_rewards_coefficient: float | None = Field(default=None, ge=0)
    """Weight of a penalty on the squared mean score, keeping scores centred on 0 (unset: none)."""


OPTIONS = Options


def head_labels(data) -> list[str]:
    return ["reward"]


def _final_is_already_merged(recipe) -> list[str]:
    if recipe.export.merged:
        return ["export.merged: a reward run's final/ is already a merged AutoModelForSequenceClassification; remove it"]
    return []


RULES = (_final_is_already_merged,)


def memory_terms(shape) -> dict[str, float]:
    # RewardTrainer runs chosen and rejected through the model in one batch of 2 x batch_size rows.
    return {"activations of the rejected responses": shape.activations(shape.batch_size)}


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` (a 1-label sequence classifier) in place; returns (trainer, TrainOutput)."""
    from trl import RewardConfig

    from llmtune.distributed import is_main_process
    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        **training_arguments(recipe, run, precision),
        max_length=recipe.data.max_length,
        center_rewards_coefficient=recipe.method.reward.center_rewards_coefficient,
        disable_dropout=True,
    )
    trainer = _merging_reward_trainer()(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[run.callback(recipe.train.save_total_limit)],
    )
    output = run_trainer(trainer, resume_from)
    if data.eval is not None and is_main_process():
        metrics = trainer.evaluate()
        run.write_json(
            "eval/after.json",
            {"accuracy": round(metrics["eval_accuracy"], 4), "margin": round(metrics["eval_margin"], 4), "n": len(data.eval)},
        )
    return trainer, output


def evaluates(recipe, data) -> bool:
    return False  # measured by the trainer itself, on the held-out pairs (training_figures)


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    raise NotImplementedError("reward runs are measured during training (training_figures)")


def training_figures(run) -> dict:
    after = run.read_json("eval/after.json")
    if not after:
        return {}
    print(
        f"[llmtune] held-out pairwise accuracy {after['accuracy']:.1%}, mean margin {after['margin']:.3f} of {after['n']} pairs"
    )
    return {"after": after}


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
