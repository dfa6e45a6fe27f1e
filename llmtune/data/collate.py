"""Batching of packed and padding-free rows, chosen by the model's attention kernel.

TRL's padding-free collator concatenates the whole batch into one sequence. That is right for
variable-length kernels (flash attention computes each example's attention alone), but sdpa and
eager attention turn the position ids into a dense block-diagonal mask over the concatenation:
batch 4 x 1024 becomes one 4096 x 4096 attention per head, 4x the work of four 1024 rows. On CPU
this made packing slower than padding (bench/packing.py: 0.95x). With such kernels llmtune keeps
the rows apart, [batch, longest row], position ids restarting at every example and no attention
mask, so transformers masks block-diagonally within each row only.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtune.data.template import IGNORE_INDEX


def is_varlen_attention(model) -> bool:
    """True for attention kernels that take packed sequences natively (flash attention 2/3, hub flash kernels)."""
    return "flash" in str(getattr(model.config, "_attn_implementation", None) or "")


@dataclass
class PackedRowsCollator:
    """Rows padded to the longest in the batch, with position ids restarting per packed example.

    Padding gets position 0 at every token, so each pad is an example of its own (attending only to
    itself) and carries no loss; the first token of every example carries no loss either, because
    the last token of the example before it would otherwise be asked to predict it.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        # TRL's collator already builds per-row position ids from `seq_lengths` (or 0..n-1 without packing).
        batch = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, return_position_ids=True)(examples)
        # transformers derives the per-example mask from position ids only when no attention mask is given.
        del batch["attention_mask"]
        batch["labels"] = torch.where(batch["position_ids"] == 0, IGNORE_INDEX, batch["labels"])
        return batch
