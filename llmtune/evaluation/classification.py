"""Accuracy and macro-F1 of a sequence classifier on the held-out rows (scikit-learn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def classification_metrics(
    model, tokenizer, dataset, label_names: list[str], batch_size: int, predictions_path: Path | None = None
) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    was_training = model.training
    model.eval()
    predicted: list[int] = []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [{"input_ids": ids} for ids in dataset[start : start + batch_size]["input_ids"]]
            batch = collate(rows).to(model.device)
            predicted += model(**batch).logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    gold = list(dataset["labels"])
    if predictions_path is not None:
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        predictions_path.write_text(
            "".join(json.dumps({"gold": label_names[g], "predicted": label_names[p]}) + "\n" for g, p in zip(gold, predicted))
        )
    return {
        "accuracy": accuracy_score(gold, predicted),
        "macro_f1": f1_score(gold, predicted, average="macro", labels=list(range(len(label_names))), zero_division=0),
        "n": len(gold),
    }
