"""Metrics that need no lm_eval: held-out perplexity, reward-model pairwise accuracy, sample generations,
and the cheap metric logged every N training steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from llmtune.data.template import IGNORE_INDEX, prompt_adds_special_tokens, prompt_text, tokenize_example


def tokenize_held_out(conversations: list[list[dict]], tokenizer, chat_template: str) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each held-out conversation, masked exactly as in training."""
    return [tokenize_example(messages, tokenizer, chat_template) for messages in conversations]


@torch.no_grad()
def perplexity(model, examples: list[tuple[list[int], list[int]]], batch_size: int = 8) -> dict[str, float]:
    """exp(mean negative log-likelihood) over every token that carries loss (the assistant's answers),
    pooled over all rows: the training loss's own definition on held-out data."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            # Right padding with label IGNORE_INDEX and attention 0: padded positions change nothing.
            input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch], device=model.device)
            labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in batch], device=model.device)
            attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=model.device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    loss = total_nll / max(1, total_tokens)
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": total_tokens}


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8) -> dict[str, float]:
    """Share of (chosen, rejected) pairs a reward model scores chosen above rejected (ties count as wrong).

    `model` is a sequence classifier with one output (AutoModelForSequenceClassification, num_labels=1).
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the classifier reads the last non-padding token of each row
    margins = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            scores = []
            for texts in ([c for c, _ in batch], [r for _, r in batch]):
                inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
                scores.append(model(**inputs).logits[:, 0].float())
            margins += (scores[0] - scores[1]).tolist()
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    n = len(margins)
    return {"pairwise_accuracy": sum(m > 0 for m in margins) / max(1, n), "mean_margin": sum(margins) / max(1, n), "n": n}


@torch.no_grad()
def sample_generations(
    model, tokenizer, prompts: list[str], chat_template: str, path: Path, max_new_tokens: int = 128
) -> list[dict]:
    """Greedy answers to a few prompts, written as JSONL so a person can read what the model says."""
    was_training = model.training
    model.eval()
    records = []
    try:
        for prompt in prompts:
            text = prompt_text([{"role": "user", "content": prompt}], tokenizer, chat_template)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=prompt_adds_special_tokens(chat_template)).to(
                model.device
            )
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            records.append(
                {"prompt": prompt, "output": tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)}
            )
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


class PeriodicPerplexity(TrainerCallback):
    """Held-out perplexity every `every` optimizer steps, appended to metrics.jsonl as its own row
    ({"step", "eval_loss", "eval_perplexity"}): cheap enough to watch a run without stopping it."""

    def __init__(self, run, examples: list[tuple[list[int], list[int]]], every: int, batch_size: int):
        self.run, self.examples, self.every, self.batch_size = run, examples, every, batch_size  # run: a RunDir

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or not state.is_world_process_zero or model is None:
            return
        result = perplexity(model, self.examples, self.batch_size)
        self.run.append_metrics(
            {"step": state.global_step, "eval_loss": round(result["loss"], 6), "eval_perplexity": round(result["perplexity"], 4)}
        )
