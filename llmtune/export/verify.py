"""What an export cost, measured: perplexity, top-1 next-token agreement and logit differences
against the full-precision model it came from, on the same token ids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_TOKENS = 512  # per text; held-out rows are short, the built-in sample is a paragraph each
BATCH = 8


@dataclass
class Measurement:
    """One model's pass over the held-out batches."""

    nll: float  # summed negative log-likelihood of every predicted token
    tokens: int
    top1: list[torch.Tensor]  # argmax per position, per batch (padding positions included, masked later)
    first_logits: torch.Tensor  # logits of the first batch, for max/mean differences

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(1, self.tokens))


def make_batches(tokenizer, texts: list[str]) -> list[dict]:
    """Right-padded batches; the same ids go to every model compared."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        return [
            dict(
                tokenizer(
                    texts[i : i + BATCH],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    add_special_tokens=False,
                )
            )
            for i in range(0, len(texts), BATCH)
        ]
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def measure(model, batches: list[dict]) -> Measurement:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll, tokens, top1, first = 0.0, 0, [], None
    for batch in tqdm(batches, desc="measuring", unit="batch", leave=False):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        predicted = logits[:, :-1]
        target, target_mask = ids[:, 1:], mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(predicted.transpose(1, 2), target, reduction="none")
        nll += losses[target_mask].sum().item()
        tokens += int(target_mask.sum())
        top1.append(predicted.argmax(-1).cpu())
        if first is None:
            first = logits.cpu()
    return Measurement(nll, tokens, top1, first)


def compare(reference: Measurement, candidate: Measurement, batches: list[dict]) -> dict:
    """The candidate's cost against the reference: perplexity change, top-1 agreement, logit differences."""
    agree = total = 0
    for ref, cand, batch in zip(reference.top1, candidate.top1, batches):
        mask = batch["attention_mask"][:, 1:].bool()
        agree += int((ref == cand)[mask].sum())
        total += int(mask.sum())
    first_mask = batches[0]["attention_mask"].bool()
    diff = (reference.first_logits - candidate.first_logits).abs()[first_mask]
    return {
        "perplexity_reference": round(reference.perplexity, 4),
        "perplexity": round(candidate.perplexity, 4),
        "perplexity_change": round(candidate.perplexity / reference.perplexity - 1, 5),
        "top1_agreement": round(agree / max(1, total), 5),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "reference_max_abs_logit": float(reference.first_logits.abs()[first_mask].max()),
        "tokens": total,
    }


def tokenizer_round_trip(reference_tokenizer, candidate_tokenizer, texts: list[str]) -> dict:
    """Same ids from both tokenizers, and the candidate decodes its ids back to the text."""
    same_ids = decodes = 0
    first_mismatch = None
    for text in texts:
        ref = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
        cand = candidate_tokenizer(text, add_special_tokens=False)["input_ids"]
        same_ids += ref == cand
        decodes += candidate_tokenizer.decode(cand) == text
        if (ref != cand or candidate_tokenizer.decode(cand) != text) and first_mismatch is None:
            first_mismatch = text[:80]
    return {
        "texts": len(texts),
        "same_ids": same_ids,
        "decodes_back": decodes,
        "chat_template_kept": (reference_tokenizer.chat_template or None) == (candidate_tokenizer.chat_template or None),
        "eos_token_kept": reference_tokenizer.eos_token == candidate_tokenizer.eos_token,
        "first_mismatch": first_mismatch,
        "ok": same_ids == decodes == len(texts),
    }


def directory_bytes(path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
