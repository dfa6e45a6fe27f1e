"""Data: sources -> canonical rows -> template + loss mask -> tokenized datasets."""

from __future__ import annotations

import random
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.data.sources import DropReport, RowError, read_source, to_canonical
from llmtune.data.template import check_template, tokenize_example
from llmtune.errors import UserError
from llmtune.recipe.schema import DataSection, DataSource


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels
    eval_rows: list  # held-out rows that passed the same checks: conversations, or (text, label) pairs
    eval: Any = None  # classification: tokenized held-out datasets.Dataset
    label_names: list[str] | None = None  # classification: the labels seen in training, sorted
    fingerprints: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: DataSection, base_dir: Path, tokenizer, seed: int) -> PreparedData:
    classification = cfg.sources[0].format == "classification"  # the recipe checks all sources agree
    if not classification:
        check_template(tokenizer, cfg.chat_template)
    drops = DropReport()
    fingerprints: dict[str, str] = {}
    train_rows = _read_all(cfg.sources, base_dir, cfg, seed, drops, fingerprints)
    eval_rows = _read_all(cfg.eval_sources, base_dir, cfg, seed, drops, fingerprints)
    if len(cfg.sources) > 1:  # mix the sources, so eval_fraction holds out rows of every source
        random.Random(seed).shuffle(train_rows)
    if not cfg.eval_sources and cfg.eval_fraction > 0:
        n_eval = max(1, round(len(train_rows) * cfg.eval_fraction))
        eval_rows, train_rows = train_rows[:n_eval], train_rows[n_eval:]

    label_names = sorted({label for _, (_, label) in train_rows}) if classification else None
    if classification and len(label_names) < 2:
        raise UserError(f"data.sources: classification needs at least two labels; the training rows have {label_names}")
    if not classification:
        eval_rows = _held_out_ends_on_answer(eval_rows, cfg, drops)
    tokenize = partial(_tokenize_classification, label_names=label_names) if classification else _tokenize
    train, _ = tokenize(train_rows, tokenizer, cfg, drops)
    evaluation, eval_rows = tokenize(eval_rows, tokenizer, cfg, drops)
    if not train["input_ids"]:
        raise UserError("data.sources: no usable training rows", describe_drops(drops.as_dict()))
    import datasets

    lengths = [len(ids) for ids in train["input_ids"]]
    stats = {
        "train_rows": len(lengths),
        "eval_rows": len(evaluation["input_ids"]),
        "train_tokens": sum(lengths),
        "max_length": max(lengths),
        "dropped": drops.as_dict(),
    }
    if classification:
        stats["labels"] = {name: train["labels"].count(i) for i, name in enumerate(label_names)}
    else:
        stats["loss_tokens"] = sum(sum(1 for t in labels if t != -100) for labels in train["labels"])
    return PreparedData(
        train=datasets.Dataset.from_dict(train),
        eval_rows=eval_rows,
        eval=datasets.Dataset.from_dict(evaluation) if classification and eval_rows else None,
        label_names=label_names,
        fingerprints=fingerprints,
        stats=stats,
    )


def _read_all(sources: list[DataSource], base_dir: Path, cfg: DataSection, seed: int, drops: DropReport, fingerprints: dict) -> list:
    rows = []
    for source in sources:
        raw_rows, fingerprint = read_source(source, base_dir)
        fingerprints[source.path or source.hub] = fingerprint
        kept = []
        for where, raw in raw_rows:
            try:
                kept.append((where, to_canonical(raw, source)))
            except RowError as exc:
                _drop(drops, cfg, str(exc), where)
        random.Random(seed).shuffle(kept)
        rows += kept[: source.max_samples]
    return rows


def _tokenize(rows: list, tokenizer, cfg: DataSection, drops: DropReport) -> tuple[dict[str, list], list]:
    """Token ids and labels of the rows that fit, and those rows' conversations."""
    out: dict[str, list] = {"input_ids": [], "labels": []}
    kept = []
    for where, messages in rows:
        try:
            input_ids, labels = tokenize_example(messages, tokenizer, cfg.chat_template)
        except RowError as exc:
            _drop(drops, cfg, str(exc), where)
            continue
        if not _fits(input_ids, cfg, drops, where):
            continue
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        kept.append(messages)
    return out, kept


def _held_out_ends_on_answer(rows: list, cfg: DataSection, drops: DropReport) -> list:
    """A held-out conversation is scored on its last turn, so that turn must be the assistant's."""
    kept = []
    for where, messages in rows:
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            _drop(drops, cfg, "held-out row does not end with a prompt and an assistant answer", where)
        else:
            kept.append((where, messages))
    return kept


def _tokenize_classification(rows: list, tokenizer, cfg: DataSection, drops: DropReport,
                             label_names: list[str]) -> tuple[dict[str, list], list]:
    out: dict[str, list] = {"input_ids": [], "labels": []}
    kept = []
    label_ids = {name: i for i, name in enumerate(label_names)}
    for where, (text, label) in rows:
        if label not in label_ids:
            _drop(drops, cfg, "label not seen in the training data", where)
            continue
        input_ids = tokenizer(text)["input_ids"]
        if not _fits(input_ids, cfg, drops, where):
            continue
        out["input_ids"].append(input_ids)
        out["labels"].append(label_ids[label])
        kept.append((text, label))
    return out, kept


def _fits(input_ids: list[int], cfg: DataSection, drops: DropReport, where: str) -> bool:
    if len(input_ids) > cfg.max_length:
        _drop(drops, cfg, f"longer than data.max_length={cfg.max_length} tokens", where)
        return False
    return True


def _drop(drops: DropReport, cfg: DataSection, reason: str, where: str) -> None:
    if cfg.strict:
        raise UserError(f"data: {where}: {reason} (data.strict is on; fix the row or set data.strict: false to drop and report it)")
    drops.add(reason, where)


def describe_drops(dropped: dict[str, dict]) -> list[str]:
    """One line per drop reason, from `stats["dropped"]`."""
    return [f"{reason}: {d['rows']} row(s), first at {', '.join(d['first'])}" for reason, d in dropped.items()]
