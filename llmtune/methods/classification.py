"""Transfer to a new task head: sequence classification with transformers' Trainer.

The head is new and randomly initialised; the adapter section decides what else trains (all of
it, nothing but the head and listed patterns, or LoRA with the head saved beside the adapter).
Held out: accuracy and macro-F1, with each row's prediction in eval/predictions-<when>.jsonl.
"""

from __future__ import annotations

KIND = "classification"
DESCRIPTION = "a new sequence-classification head on the base; labels and their count come from the data"
FORMATS = ("classification",)
EXAMPLES = "classification"
MODEL = "sequence_classifier"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
OPTIONS = None
PACKING_AND_STREAMING = False


def head_labels(data) -> list[str] | None:
    """The labels seen in training (None before the data is read, e.g. by `llmtune plan`)."""
    return data.label_names if data is not None else None


def _no_language_model_evaluation(recipe) -> list[str]:
    e = recipe.eval
    problems = []
    if e.exact_match:
        problems.append(
            "eval.exact_match: scores generated text; classification reports accuracy and macro-F1 by itself; remove it"
        )
    if e.perplexity or e.every_n_steps or e.sample_prompts or e.suites or e.tasks:
        problems.append(
            "eval: perplexity, every_n_steps, sample_prompts, suites and tasks score language models; "
            "a classifier reports accuracy and macro-F1 by itself; remove them"
        )
    return problems


def _no_language_model_export(recipe) -> list[str]:
    if recipe.export.merged or recipe.export.formats:
        key = "export.merged" if recipe.export.merged else "export.formats"
        return [
            f"{key}: export covers causal language models; a classifier's final/ already loads with "
            "AutoPeftModelForSequenceClassification (or AutoModelForSequenceClassification); remove it"
        ]
    return []


RULES = (_no_language_model_evaluation, _no_language_model_export)


def memory_terms(shape) -> dict[str, float]:
    return {}  # the head is part of the model plan.py counts; a few logits per row, no vocabulary


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    trainer = Trainer(
        model=model,
        args=TrainingArguments(**training_arguments(recipe, run, precision)),
        train_dataset=data.train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[run.callback(recipe.train.save_total_limit)],
    )
    return trainer, run_trainer(trainer, resume_from)


def evaluates(recipe, data) -> bool:
    return data.eval is not None


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    from llmtune.evaluation.classification import classification_metrics

    result = classification_metrics(
        model,
        tokenizer,
        data.eval,
        data.label_names,
        recipe.train.batch_size,
        predictions_path=run.path / "eval" / f"predictions-{when}.jsonl",
    )
    print(
        f"[llmtune] held-out accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f} "
        f"of {result['n']} {when} training"
    )
    return result


def training_figures(run) -> dict:
    return {}
