"""What every method built on a transformers/TRL Trainer shares: its arguments and how it runs."""

from __future__ import annotations

from llmtune.models.load import Precision, training_device
from llmtune.recipe import Recipe
from llmtune.runs import RunDir


def training_arguments(recipe: Recipe, run: RunDir, precision: Precision) -> dict:
    """TrainingArguments fields every method uses, read from the recipe's train section."""
    t = recipe.train
    return dict(
        output_dir=str(run.staging),  # RunCallback renames each finished checkpoint into checkpoints/
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation happens after the rename, in RunCallback
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        dataloader_num_workers=t.dataloader_num_workers,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=training_device().type == "cpu",
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,  # RunCallback draws one bar with the loss instead of printing every log dict
        eval_strategy="no",
    )


def run_trainer(trainer, resume_from: str | None):
    """Train with llmtune's run-directory callback in place of transformers' log printing."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log dict otherwise
    seed_this_rank(trainer.args)
    return trainer.train(resume_from_checkpoint=resume_from)


def seed_this_rank(args) -> None:
    """Dropout and other training-time randomness get a seed per rank (seed + rank).

    Initial weights were drawn before this with the same seed on every rank, so all ranks start
    identical; the data order comes from the sampler's own seed (data_seed), shared by all ranks so
    they split one shuffled order. With one process this is the recipe's seed, unchanged.
    """
    from transformers import set_seed

    set_seed(args.seed + args.process_index)
