"""Exact match on held-out conversations: greedy-generate the last assistant turn and compare."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmtune.data.template import prompt_adds_special_tokens, prompt_text
from llmtune.recipe.schema import ExactMatchSection


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    conversations: list[list[dict]],
    cfg: ExactMatchSection,
    chat_template: str,
    generations_path: Path | None = None,
    desc: str = "exact match",
) -> dict[str, float]:
    """Share of held-out rows whose generated answer equals the reference (whitespace-stripped)."""
    from tqdm.auto import tqdm

    rows = conversations[: cfg.limit]
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    records = []
    try:
        for start in tqdm(range(0, len(rows), cfg.batch_size), desc=desc, unit="batch", leave=False):
            batch = rows[start : start + cfg.batch_size]
            prompts = [prompt_text(m[:-1], tokenizer, chat_template) for m in batch]
            inputs = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=prompt_adds_special_tokens(chat_template)
            ).to(model.device)
            out = model.generate(
                **inputs,
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=_stop_ids(model, tokenizer),
            )
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for messages, answer in zip(batch, answers):
                reference = messages[-1]["content"]
                records.append(
                    {
                        "prompt": messages[-2]["content"],
                        "reference": reference,
                        "output": answer,
                        "match": answer.strip() == reference.strip(),
                    }
                )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    if generations_path is not None:
        generations_path.parent.mkdir(parents=True, exist_ok=True)
        generations_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"exact_match": sum(r["match"] for r in records) / max(1, len(records)), "n": len(records)}


def _stop_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return sorted({*ids, tokenizer.eos_token_id} - {None})
