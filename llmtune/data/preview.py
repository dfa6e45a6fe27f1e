"""`llmtune data preview`: what training will see, before it runs.

Rendered examples with the loss-carrying tokens highlighted, a token-length histogram, and rows
kept and dropped per reason: the usual data failures (wrong loss mask, template mismatch, silently
dropped rows) show up here in seconds instead of after hours of training.
"""

from __future__ import annotations

import json

from llmtune.data import PreparedData, describe_drops
from llmtune.data.template import IGNORE_INDEX


def preview(data: PreparedData, tokenizer, n: int, max_length: int) -> dict:
    """The preview as plain data (what --json prints)."""
    examples = []
    for row in data.train.select(range(min(n, len(data.train)))):
        if "input_ids" in row and data.kind != "classification":
            examples.append(
                {
                    "segments": loss_segments(row["input_ids"], row["labels"], tokenizer),
                    "tokens": len(row["input_ids"]),
                    "loss_tokens": sum(label != IGNORE_INDEX for label in row["labels"]),
                }
            )
        elif data.kind == "classification":
            examples.append({"text": tokenizer.decode(row["input_ids"]), "label": data.label_names[row["labels"]]})
        else:  # preference / feedback / prompt-only rows, rendered as the trainer's prompt plus each answer
            rendered = {"prompt": tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)}
            for answer in ("chosen", "rejected", "completion"):
                if answer in row:
                    rendered[answer] = row[answer][-1]["content"]
            if "label" in row:
                rendered["label"] = "desirable" if row["label"] else "undesirable"
            examples.append(rendered)
    lengths = _lengths(data)
    return {"kind": data.kind, "stats": data.stats, "examples": examples, "length_histogram": histogram(lengths, max_length)}


def loss_segments(input_ids: list[int], labels: list[int], tokenizer) -> list[dict]:
    """Consecutive tokens grouped by whether they carry loss, decoded: [{text, loss}, ...]."""
    segments: list[dict] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            segments.append({"text": tokenizer.decode(input_ids[start:i]), "loss": labels[start] != IGNORE_INDEX})
            start = i
    return segments


def histogram(lengths: list[int], max_length: int, bins: int = 10) -> list[dict]:
    """Counts of examples per token-length bin, from 1 to the longest example (at most max_length)."""
    top = min(max(lengths, default=1), max_length)
    width = max(1, -(-top // bins))
    bins = -(-top // width)
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - 1) // width if n else 0)] += 1
    return [{"from": i * width + 1, "to": min((i + 1) * width, top), "rows": c} for i, c in enumerate(counts)]


def _lengths(data: PreparedData) -> list[int]:
    if "input_ids" in data.train.column_names:
        return [len(ids) for ids in data.train["input_ids"]]
    return []  # conversational rows are tokenized by the trainer; data.stats holds their token totals


def print_preview(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console()
    for i, example in enumerate(result["examples"], start=1):
        if "segments" in example:
            text = Text()
            for seg in example["segments"]:
                text.append(seg["text"], style="bold green" if seg["loss"] else "dim")
            title = f"example {i}: {example['tokens']} tokens, {example['loss_tokens']} carry loss (green)"
        else:
            text = Text("\n\n".join(f"[{k}]\n{v}" for k, v in example.items()))
            title = f"example {i}"
        console.print(Panel(text, title=title, title_align="left"))
    stats = result["stats"]
    table = Table(title="rows", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kind", result["kind"])
    for key in ("train_rows", "eval_rows", "train_tokens", "loss_tokens", "max_length"):
        if key in stats:
            table.add_row(key.replace("_", " "), f"{stats[key]:,}")
    for label, n in (stats.get("labels") or {}).items():  # feedback rows
        table.add_row(label, f"{n:,}")
    for name, counts in (stats.get("sources") or {}).items():
        table.add_row(f"source {name}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    dropped = stats.get("dropped") or {}
    table.add_row("dropped", str(sum(d["rows"] for d in dropped.values())))
    for line in describe_drops(dropped):
        table.add_row("", line)
    console.print(table)
    bars = result["length_histogram"]
    if any(b["rows"] for b in bars):
        top = max(b["rows"] for b in bars)
        console.print("[bold]token lengths[/bold]")
        for b in bars:
            console.print(f"  {b['from']:>6}-{b['to']:<6} {'#' * round(40 * b['rows'] / top):<40} {b['rows']}")
