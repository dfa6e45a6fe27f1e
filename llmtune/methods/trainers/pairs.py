"""Reference-free preference losses (ORPO, SimPO) on transformers' Trainer, and their held-out measure.

TRL 1.16 has them only in trl.experimental (ORPOTrainer, CPOTrainer with loss_type="simpo"), whose
tokenization differs from the rest of llmtune: they prepend the tokenizer's BOS where the chat
template has none, append an EOS after the template's own end of turn, and (ORPO) put the NLL on
the prompt tokens too. DPOTrainer always scores against a reference. So the pairs are rendered
here with llmtune.data's own tokenize_example (the chat template, loss on the assistant turn with
its end-of-turn marker: what SFT trains and inference sees), chosen and rejected go through the
model as one batch, and nothing else is held: no reference model, no adapter-disabled pass.

Both losses read each answer's mean per-token log-probability (length-normalised), and log the
same names as TRL's trainers: rewards/chosen, rewards/rejected (beta x that mean), rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import Trainer

from llmtune.data.template import IGNORE_INDEX, tokenize_example

# loss(chosen mean log-prob, rejected mean log-prob, chosen token-mean NLL) -> (loss, extra metrics)
PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def tokenize_pairs(rows, tokenizer, chat_template: str):
    """Preference rows -> token ids and loss-masked labels of prompt + chosen and prompt + rejected."""
    import datasets

    columns: dict[str, list] = defaultdict(list)
    for row in rows:
        for side in ("chosen", "rejected"):
            input_ids, labels = tokenize_example(row["prompt"] + row[side], tokenizer, chat_template)
            columns[f"{side}_input_ids"].append(input_ids)
            columns[f"{side}_labels"].append(labels)
    return datasets.Dataset.from_dict(dict(columns))


class PairCollator:
    """A batch of n pairs as 2n rows, the chosen answers first, padded on the right."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(f[f"{side}_input_ids"], f[f"{side}_labels"]) for side in ("chosen", "rejected") for f in features]
        return pad_rows(rows, self.pad_token_id)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(input_ids, labels) rows as one batch, padded on the right."""
    width = max(len(ids) for ids, _ in rows)
    return {
        "input_ids": torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in rows]),
    }


def answer_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p over its answer tokens (labels != IGNORE_INDEX) and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    target = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(-1), (target != IGNORE_INDEX).sum(-1)


def held_out_answer_logprobs(
    model, rows: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int
) -> tuple[list[float], list[int]]:
    """answer_logprobs over tokenized (input_ids, labels) rows, in eval mode without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in pad_rows(rows[start : start + batch_size], pad_token_id).items()}
            s, c = answer_logprobs(model, batch)
            sums += s.tolist()
            counts += c.tolist()
    model.train(was_training)
    return sums, counts


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PairTrainer(Trainer):
    """Trainer on PairCollator batches with a reference-free pair loss; `beta` scales the logged rewards."""

    def __init__(self, *args, pair_loss: PairLoss, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.pair_loss, self.beta = pair_loss, beta
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts = answer_logprobs(model, inputs)
        n = sums.shape[0] // 2
        means = sums / counts.clamp(min=1)
        chosen, rejected = means[:n], means[n:]
        chosen_nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)  # token-mean NLL of the chosen answers
        loss, extra = self.pair_loss(chosen, rejected, chosen_nll)
        if model.training:
            rewards_chosen, rewards_rejected = self.beta * chosen.detach(), self.beta * rejected.detach()
            figures = {
                "rewards/chosen": rewards_chosen.mean(),
                "rewards/rejected": rewards_rejected.mean(),
                "rewards/accuracies": (rewards_chosen > rewards_rejected).float().mean(),
                "rewards/margins": (rewards_chosen - rewards_rejected).mean(),
                "logps/chosen": chosen.detach().mean(),
                "logps/rejected": rejected.detach().mean(),
            }
            for name, value in (figures | extra).items():
                self._metrics[name].append(float(value))
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # the averages over the steps since the last log row
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items() if values})
            self._metrics.clear()
        super().log(logs, start_time)


def train_pairs(recipe, run, model, tokenizer, data, precision, resume_from: str | None, pair_loss: PairLoss, beta: float):
    """Train `model` in place on data.train's preference rows with `pair_loss`; returns (trainer, TrainOutput)."""
    from transformers import TrainingArguments
    from trl.trainer.utils import disable_dropout_in_model

    from llmtune.methods.trainers.hf import run_trainer, training_arguments

    disable_dropout_in_model(model)  # as TRL's preference trainers do (disable_dropout=True): LoRA dropout included
    trainer = PairTrainer(
        model=model,
        args=TrainingArguments(**training_arguments(recipe, run, precision)),
        train_dataset=tokenize_pairs(data.train, tokenizer, recipe.data.chat_template),
        data_collator=PairCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[run.callback(recipe.train.save_total_limit)],
        pair_loss=pair_loss,
        beta=beta,
    )
    return trainer, run_trainer(trainer, resume_from)


def evaluate_pairs(recipe, model, tokenizer, rows: list[dict], when: str, batch_size: int = 8) -> dict:
    """Held-out pairs, by each answer's mean per-token log-probability (what ORPO and SimPO raise):
    `accuracy`, the share of pairs whose chosen answer scores higher; `margin`, the mean of chosen
    minus rejected; `logp_margin`, the same for the answers' summed log-probabilities."""
    chat_template = recipe.data.chat_template  # the n chosen answers, then the n rejected ones
    tokenized = [
        tokenize_example(row["prompt"] + row[side], tokenizer, chat_template) for side in ("chosen", "rejected") for row in rows
    ]
    sums, counts = held_out_answer_logprobs(model, tokenized, tokenizer.pad_token_id, 2 * batch_size)
    n = len(rows)
    means = [s / max(c, 1) for s, c in zip(sums, counts)]
    margins = [means[i] - means[n + i] for i in range(n)]
    result = {
        "n": n,
        "accuracy": round(sum(m > 0 for m in margins) / n, 4),
        "margin": round(sum(margins) / n, 4),
        "logp_margin": round(sum(sums[i] - sums[n + i] for i in range(n)) / n, 4),
    }
    print(
        f"[llmtune] held-out pairs preferring the chosen answer (mean per-token log-prob): {result['accuracy']:.1%}, "
        f"margin {result['margin']:.3f} of {n} {when} training"
    )
    return result
