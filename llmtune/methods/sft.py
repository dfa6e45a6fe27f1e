"""Supervised fine-tuning through TRL's SFTTrainer on pre-tokenized rows.

Rows arrive with `input_ids` and `labels` (loss mask applied by llmtune.data), so TRL's own
preparation is skipped and the mask is exactly the one llmtune's data step built and reports.
Held out: exact match of greedy answers (eval.exact_match), when the recipe asks for it.
"""

from __future__ import annotations

from llmtune.errors import UserError

KIND = "sft"
DESCRIPTION = "supervised fine-tuning: loss on the assistant/completion tokens"
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
EXAMPLES = "lm"
MODEL = "causal_lm"
WHOLE_WEIGHTS_PER_RANK = False
REWARD_MODEL_KEY = None
OPTIONS = None
PACKING_AND_STREAMING = True  # the one method whose rows may be packed, padding-free or streamed
RULES = ()


def memory_terms(shape) -> dict[str, float]:
    return {"logits and loss": shape.logits(shape.batch_size)}


def evaluates(recipe, data) -> bool:
    if recipe.eval.exact_match is not None and not data.eval_rows:
        from llmtune.data import describe_drops

        raise UserError(
            "eval.exact_match: no usable held-out rows (see the drop reasons in the data report)",
            describe_drops(data.stats["dropped"]),
        )
    return recipe.eval.exact_match is not None


def evaluate(recipe, run, model, tokenizer, data, when: str) -> dict:
    """Exact match of the greedy answers to the held-out prompts."""
    from llmtune.evaluation.exact_match import exact_match

    result = exact_match(
        model,
        tokenizer,
        data.eval_rows,
        recipe.eval.exact_match,
        recipe.data.chat_template,
        generations_path=run.path / "eval" / f"generations-{when}.jsonl",
        desc=f"exact match ({when})",
    )
    print(f"[llmtune] held-out exact match {result['exact_match']:.1%} of {result['n']} {when} training")
    return result


def training_figures(run) -> dict:
    return {}


def train(recipe, run, model, tokenizer, data, precision, resume_from: str | None):
    """Train `model` in place; returns (trainer, TrainOutput)."""
    import sys

    from trl import SFTConfig

    from llmtune.data.collate import PackedRowsCollator, is_varlen_attention
    from llmtune.evaluation.stage import periodic_callbacks
    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    cfg = recipe.data
    # Packed rows (llmtune.data.pack) carry seq_lengths, turned into position ids restarting per example
    # and no attention mask, so attention stays per example. Flash attention takes the whole batch as one
    # sequence (TRL's padding-free collator); other kernels keep the rows apart (see llmtune.data.collate).
    varlen = is_varlen_attention(model)
    rows_apart = (cfg.packing or cfg.padding_free) and not varlen
    args = SFTConfig(
        **training_arguments(recipe, run, precision),
        # Rows are already cut to max_length by llmtune.data; TRL refuses a max_length with padding-free batches.
        max_length=None if cfg.padding_free else cfg.max_length,
        packing=cfg.packing and varlen,
        padding_free=cfg.padding_free and varlen,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    if cfg.padding_free and not varlen:
        print(
            "[llmtune] data.padding_free: the attention kernel is not flash attention, so rows stay apart and "
            "are padded (one long sequence would cost quadratic attention); set model.attn_implementation: "
            "flash_attention_2 on a GPU to drop the padding",
            file=sys.stderr,
        )
    collator = PackedRowsCollator(tokenizer.pad_token_id) if rows_apart else None
    trainer = _sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=data.train,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[run.callback(recipe.train.save_total_limit), *periodic_callbacks(recipe, run, tokenizer, data)],
    )
    return trainer, run_trainer(trainer, resume_from)


def _sft_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class SFTTrainerPlainLossOnCPU(SFTTrainer):
        """TRL's SFTTrainer, computing the loss through the model's own forward on CPU.

        TRL 1.16 always scores tokens through a chunked "fused LM head" (plus entropy and top-1
        metrics). On GPUs it saves memory on large vocabularies; on CPU it nearly doubles the step
        time (measured on SmolLM2-135M, batch 8 x 95 tokens: 6.0-7.0 s against 3.6-3.9 s).
        transformers' own Trainer.compute_loss gives the same token-averaged loss, gradient
        accumulation included (tests/test_train.py checks the loss equals TRL's and that batch x
        accumulation is equivalent). Only TRL's entropy and
        token-accuracy log entries are lost on CPU.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.args.device.type != "cpu":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # As TRL does: with a KV cache in the forward, transformers would not derive the per-example
            # attention of packed rows from their position ids, and packed examples would see each other.
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return SFTTrainerPlainLossOnCPU
