"""Transfer to a new task head: sequence classification with transformers' Trainer.

The head is new and randomly initialised; the adapter section decides what else trains (all of
it, nothing but the head and listed patterns, or LoRA with the head saved beside the adapter).
"""

from __future__ import annotations

from llmtune.methods import run_trainer, training_arguments
from llmtune.models.load import Precision
from llmtune.recipe import Recipe
from llmtune.runs import RunCallback, RunDir


def train_classification(recipe: Recipe, run: RunDir, model, tokenizer, data, precision: Precision, resume_from: str | None):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    trainer = Trainer(model=model, args=TrainingArguments(**training_arguments(recipe, run, precision)),
                      train_dataset=data.train, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[RunCallback(run, recipe.train.save_total_limit)])
    return trainer, run_trainer(trainer, resume_from)
