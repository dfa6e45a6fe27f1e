"""Data: sources -> canonical examples -> template + loss mask -> tokenized (and packed) datasets.

Every row that does not make it into training is counted by reason with its first row numbers
(`stats["dropped"]`), or stops the run when `data.strict` is on: never a silent drop.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.data.cache import TokenizedCache
from llmtune.data.formats import KIND_OF_FORMAT, RowError, as_feedback, to_canonical
from llmtune.data.sources import DropReport, read_source
from llmtune.data.template import count_preference_tokens, prompt_text, set_chat_template, tokenize_example, tokenize_text
from llmtune.errors import UserError
from llmtune.recipe.schema import DataSection, DataSource


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids + labels (sft, classification), or TRL's conversational columns
    eval_rows: list  # held-out rows that passed the same checks: conversations, (text, label) pairs, or examples
    eval: Any = None  # classification, preference, prompt-only: the held-out datasets.Dataset
    label_names: list[str] | None = None  # classification: the labels seen in training, sorted
    fingerprints: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    kind: str = "chat"  # chat | text | preference | prompt | classification | feedback (see formats.KIND_OF_FORMAT)


def prepare_data(cfg: DataSection, base_dir: Path, tokenizer, seed: int, examples: str | None = None) -> PreparedData:
    """Read, check, render and tokenize the data section's rows.

    `examples` is what the method trains on (its EXAMPLES, see llmtune.methods); the recipe has
    already checked that the sources' formats give it. Unset: whatever the formats give.
    `feedback` also takes preference pairs: each becomes a desirable and an undesirable row.
    """
    kind = "feedback" if examples == "feedback" else data_kind(cfg)
    if kind != "classification":
        set_chat_template(tokenizer, cfg.chat_template if kind != "text" else "none", base_dir)
    drops = DropReport()
    fingerprints: dict[str, str] = {}
    if cfg.streaming:
        return _streamed(cfg, base_dir, tokenizer, seed, drops, fingerprints)
    raw_train = [_read(source, base_dir, cfg, seed, drops, fingerprints) for source in cfg.sources]
    raw_eval = [_read(source, base_dir, cfg, seed, drops, fingerprints) for source in cfg.eval_sources]

    cache = TokenizedCache(cfg, fingerprints, tokenizer, seed, examples) if cfg.cache else None
    if cache and (hit := cache.load()):
        print(f"[llmtune] tokenized data reused from the cache ({cache.path})", file=sys.stderr)
        return hit

    train_rows, mixture = _mix(raw_train, cfg, seed)
    eval_rows = [row for rows in raw_eval for row in rows]
    if len(cfg.sources) > 1:  # mix the sources, so eval_fraction holds out rows of every source
        random.Random(seed).shuffle(train_rows)
    if cfg.dedup:
        train_rows = _dedup(train_rows, cfg, drops, "exact duplicate of an earlier training row")
    if not cfg.eval_sources and cfg.eval_fraction > 0:
        n_eval = max(1, round(len(train_rows) * cfg.eval_fraction))
        eval_rows, train_rows = train_rows[:n_eval], train_rows[n_eval:]
    if cfg.dedup:
        seen = {_key(example) for _, example in train_rows}
        eval_rows = _dedup(eval_rows, cfg, drops, "held-out row also in the training rows", seen)
    if kind == "feedback":  # after the split: both rows of a pair are held out, or neither
        train_rows, eval_rows = _unpaired(train_rows, seed), _unpaired(eval_rows)

    data = TOKENIZERS[kind](train_rows, eval_rows, tokenizer, cfg, drops)
    data.kind = kind
    data.fingerprints = fingerprints
    if not len(data.train):
        raise UserError("data.sources: no usable training rows", describe_drops(drops.as_dict()))
    data.stats["sources"] = mixture
    data.stats["dropped"] = drops.as_dict()
    if cfg.packing:
        data.train, data.stats["packing"] = pack(data.train, cfg.max_length)
    if cache:
        cache.save(data)
    return data


def _streamed(cfg: DataSection, base_dir: Path, tokenizer, seed: int, drops: DropReport, fingerprints: dict) -> PreparedData:
    """Training rows read, checked and tokenized only as the trainer asks for them, so a source may
    be larger than memory. Order: the sources one after another through a seeded shuffle buffer.
    The counts in `stats` grow as rows stream by; the run summary reports their final values."""
    import datasets

    # "streamed": what was read, which includes rows the trainer peeks at and a last partial batch.
    stats: dict[str, Any] = {"streaming": True, "rows_streamed": 0, "tokens_streamed": 0, "dropped": {}}
    fingerprints.update({s.path or s.hub: read_source(s, base_dir, streaming=True)[1] for s in cfg.sources})

    def rows():
        for source in cfg.sources:
            used = 0
            for where, raw in read_source(source, base_dir, streaming=True, fingerprint=False)[0]:
                if source.max_samples and used >= source.max_samples:
                    break
                try:
                    example = to_canonical(raw, source)
                except RowError as exc:
                    _drop(drops, cfg, str(exc), where)
                    stats["dropped"] = drops.as_dict()
                    continue
                pieces = _lm_pieces(example, tokenizer, cfg, drops, where)
                stats["dropped"] = drops.as_dict()
                used += bool(pieces)
                for input_ids, labels in pieces:
                    stats["rows_streamed"] += 1
                    stats["tokens_streamed"] += len(input_ids)
                    yield {"input_ids": input_ids, "labels": labels}

    train = datasets.IterableDataset.from_generator(rows).shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    held_out = [row for source in cfg.eval_sources for row in _read(source, base_dir, cfg, seed, drops, fingerprints)]
    evaluation = _tokenize_lm([], held_out, tokenizer, cfg, drops)
    stats["eval_rows"] = evaluation.stats["eval_rows"]
    stats["dropped"] = drops.as_dict()
    return PreparedData(
        train=train,
        eval_rows=evaluation.eval_rows,
        eval=evaluation.eval,
        stats=stats,
        fingerprints=fingerprints,
        kind=data_kind(cfg),
    )


def data_kind(cfg: DataSection) -> str:
    """What the training rows become; the recipe checks the formats suit the method."""
    kinds = {KIND_OF_FORMAT[s.format] for s in cfg.sources}
    # Chat and plain text both become token ids with a loss mask, so they mix (e.g. replay data).
    return "chat" if kinds == {"chat", "text"} else kinds.pop()


def _read(
    source: DataSource, base_dir: Path, cfg: DataSection, seed: int, drops: DropReport, fingerprints: dict
) -> list[tuple[str, dict]]:
    """One source's canonical examples, seeded-shuffled and cut to max_samples."""
    raw_rows, fingerprint = read_source(source, base_dir)
    fingerprints[source.path or source.hub] = fingerprint
    kept = []
    for where, raw in raw_rows:
        try:
            kept.append((where, to_canonical(raw, source)))
        except RowError as exc:
            _drop(drops, cfg, str(exc), where)
    random.Random(seed).shuffle(kept)
    return kept[: source.max_samples]


def _mix(per_source: list[list], cfg: DataSection, seed: int) -> tuple[list, dict]:
    """All rows of every source, or rows drawn in the sources' weight proportions; and the counts."""
    names = [s.path or s.hub for s in cfg.sources]
    if cfg.sources[0].weight is None:
        return [r for rows in per_source for r in rows], {
            n: {"available": len(r), "drawn": len(r)} for n, r in zip(names, per_source)
        }
    weights = [s.weight / sum(s.weight for s in cfg.sources) for s in cfg.sources]
    available = [len(rows) for rows in per_source]
    if any(n == 0 for n in available):
        empty = names[available.index(0)]
        raise UserError(f"data.sources: {empty} has no usable rows to mix (see the drop reasons)")
    # Without mixture_size: the largest total that no source has to repeat rows for.
    total = cfg.mixture_size or int(min(n / w for n, w in zip(available, weights)) + 1e-9)
    counts = _largest_remainder(total, weights)
    rows, report = [], {}
    for name, source_rows, n_available, n in zip(names, per_source, available, counts):
        drawn = list(source_rows)
        while len(drawn) < n:  # a source that runs short is cycled, in a fresh order each pass
            again = list(source_rows)
            random.Random(seed + len(drawn)).shuffle(again)
            drawn += again
        rows += drawn[:n]
        report[name] = {"available": n_available, "drawn": n, "share": round(n / total, 4)}
        if n > n_available:
            report[name]["repeated_rows"] = n - n_available
    return rows, report


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer counts summing to `total`, as close to total x weight as integers allow."""
    exact = [total * w for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _key(example: dict) -> str:
    return json.dumps(example, sort_keys=True, ensure_ascii=False)


def _unpaired(rows: list, seed: int | None = None) -> list:
    """Feedback rows, preference pairs split in two. Training rows are shuffled again (seeded): KTO
    reads them in order, and a batch should mix labels, each row's neighbour (its KL-term
    completion) being an answer to another prompt, not the other answer of its own pair."""
    out = [(where, row) for where, example in rows for row in as_feedback(example)]
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


def _dedup(rows: list, cfg: DataSection, drops: DropReport, reason: str, seen: set | None = None) -> list:
    seen = set() if seen is None else set(seen)
    kept = []
    for where, example in rows:
        key = _key(example)
        if key in seen:
            _drop(drops, cfg, reason, where)
        else:
            seen.add(key)
            kept.append((where, example))
    return kept


# --- tokenization, one function per kind of example -------------------------------------------


def _tokenize_lm(train_rows: list, eval_rows: list, tokenizer, cfg: DataSection, drops: DropReport) -> PreparedData:
    """Chat and text rows -> input_ids + labels; held-out chat rows stay conversations for generation."""
    import datasets

    train: dict[str, list] = {"input_ids": [], "labels": []}
    for where, example in train_rows:
        for input_ids, labels in _lm_pieces(example, tokenizer, cfg, drops, where):
            train["input_ids"].append(input_ids)
            train["labels"].append(labels)
    eval_kept, eval_tokens = [], {"input_ids": [], "labels": []}
    for where, example in _held_out_ends_on_answer(eval_rows, cfg, drops):
        pieces = _lm_pieces(example, tokenizer, cfg, drops, where)
        if pieces and "messages" in example:  # conversations are also scored by generation
            eval_kept.append(example["messages"])
            eval_tokens["input_ids"] += [p[0] for p in pieces]
            eval_tokens["labels"] += [p[1] for p in pieces]
    lengths = [len(ids) for ids in train["input_ids"]]
    stats = {
        "train_rows": len(lengths),
        "eval_rows": len(eval_tokens["input_ids"]),
        "train_tokens": sum(lengths),
        "max_length": max(lengths, default=0),
        "loss_tokens": sum(sum(1 for t in labels if t != -100) for labels in train["labels"]),
    }
    return PreparedData(
        train=datasets.Dataset.from_dict(train),
        eval_rows=eval_kept,
        eval=datasets.Dataset.from_dict(eval_tokens) if eval_tokens["input_ids"] else None,
        stats=stats,
    )


def _lm_pieces(example: dict, tokenizer, cfg: DataSection, drops: DropReport, where: str) -> list[tuple[list, list]]:
    if "text" in example:
        return [(ids, list(ids)) for ids in tokenize_text(example["text"], tokenizer, cfg.max_length)]
    try:
        input_ids, labels = tokenize_example(example["messages"], tokenizer, cfg.chat_template, cfg.loss_on)
    except RowError as exc:
        _drop(drops, cfg, str(exc), where)
        return []
    if not _fits(len(input_ids), cfg, drops, where):
        return []
    return [(input_ids, labels)]


def _held_out_ends_on_answer(rows: list, cfg: DataSection, drops: DropReport) -> list:
    """A held-out conversation is scored on its last turn, so that turn must be the assistant's."""
    kept = []
    for where, example in rows:
        if "text" in example:
            kept.append((where, example))
        elif example["messages"][-1]["role"] != "assistant" or len(example["messages"]) < 2:
            _drop(drops, cfg, "held-out row does not end with a prompt and an assistant answer", where)
        else:
            kept.append((where, example))
    return kept


def _tokenize_classification(train_rows: list, eval_rows: list, tokenizer, cfg: DataSection, drops: DropReport) -> PreparedData:
    import datasets

    label_names = sorted({example["label"] for _, example in train_rows})
    if len(label_names) < 2:
        raise UserError(f"data.sources: classification needs at least two labels; the training rows have {label_names}")
    label_ids = {name: i for i, name in enumerate(label_names)}

    def tokenize(rows):
        out: dict[str, list] = {"input_ids": [], "labels": []}
        kept = []
        for where, example in rows:
            if example["label"] not in label_ids:
                _drop(drops, cfg, "label not seen in the training data", where)
                continue
            input_ids = tokenizer(example["text"])["input_ids"]
            if _fits(len(input_ids), cfg, drops, where):
                out["input_ids"].append(input_ids)
                out["labels"].append(label_ids[example["label"]])
                kept.append((example["text"], example["label"]))
        return out, kept

    train, _ = tokenize(train_rows)
    evaluation, eval_kept = tokenize(eval_rows)
    lengths = [len(ids) for ids in train["input_ids"]]
    stats = {
        "train_rows": len(lengths),
        "eval_rows": len(eval_kept),
        "train_tokens": sum(lengths),
        "max_length": max(lengths, default=0),
        "labels": {name: train["labels"].count(i) for i, name in enumerate(label_names)},
    }
    return PreparedData(
        train=datasets.Dataset.from_dict(train),
        eval_rows=eval_kept,
        eval=datasets.Dataset.from_dict(evaluation) if eval_kept else None,
        label_names=label_names,
        stats=stats,
    )


def _conversational(train_rows: list, eval_rows: list, tokenizer, cfg: DataSection, drops: DropReport) -> PreparedData:
    """Preference, feedback and prompt-only examples stay in TRL's conversational layout (the trainers
    render them with the same chat template); rows too long for data.max_length are dropped here."""
    import datasets

    def kept(rows):
        out, lengths = [], []
        for where, example in rows:
            try:
                if "chosen" in example:
                    n = count_preference_tokens(example, tokenizer, cfg.chat_template)
                elif "completion" in example:
                    n = len(tokenize_example(example["prompt"] + example["completion"], tokenizer, cfg.chat_template)[0])
                else:
                    n = len(
                        tokenizer(prompt_text(example["prompt"], tokenizer, cfg.chat_template), add_special_tokens=False)[
                            "input_ids"
                        ]
                    )
            except RowError as exc:
                _drop(drops, cfg, str(exc), where)
                continue
            if _fits(n, cfg, drops, where):
                out.append(example)
                lengths.append(n)
        return out, lengths

    train, lengths = kept(train_rows)
    evaluation, _ = kept(eval_rows)
    stats = {
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "train_tokens": sum(lengths),
        "max_length": max(lengths, default=0),
    }
    if train and "label" in train[0]:  # feedback: how many answers of each kind (KTO weighs the two)
        desirable = sum(example["label"] for example in train)
        stats["labels"] = {"desirable": desirable, "undesirable": len(train) - desirable}
    return PreparedData(
        train=datasets.Dataset.from_list(train),
        eval_rows=evaluation,
        eval=datasets.Dataset.from_list(evaluation) if evaluation else None,
        stats=stats,
    )


TOKENIZERS = {
    "chat": _tokenize_lm,
    "text": _tokenize_lm,
    "classification": _tokenize_classification,
    "preference": _conversational,
    "prompt": _conversational,
    "feedback": _conversational,
}


def pack(train, max_length: int):
    """Bin-pack tokenized examples into max_length rows (TRL's best-fit-decreasing packer).

    Each packed row keeps `seq_lengths`, from which TRL's padding-free collator rebuilds position ids
    that restart at every example; transformers then masks attention block-diagonally, so packed
    examples never see each other (tests/test_data.py checks per-example losses are unchanged).
    """
    from trl import pack_dataset

    packed = pack_dataset(train, max_length, strategy="bfd")
    tokens = sum(sum(lengths) for lengths in packed["seq_lengths"])
    return packed, {"rows": len(packed), "examples": len(train), "fill": round(tokens / (len(packed) * max_length), 4)}


def _fits(n_tokens: int, cfg: DataSection, drops: DropReport, where: str) -> bool:
    if n_tokens > cfg.max_length:
        _drop(drops, cfg, f"longer than data.max_length={cfg.max_length} tokens", where)
        return False
    return True


def _drop(drops: DropReport, cfg: DataSection, reason: str, where: str) -> None:
    if cfg.strict:
        raise UserError(
            f"data: {where}: {reason} (data.strict is on; fix the row or set data.strict: false to drop and report it)"
        )
    drops.add(reason, where)


def describe_drops(dropped: dict[str, dict]) -> list[str]:
    """One line per drop reason, from `stats["dropped"]`."""
    return [f"{reason}: {d['rows']} row(s), first at {', '.join(d['first'])}" for reason, d in dropped.items()]
