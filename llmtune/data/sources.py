"""Read data sources into canonical rows, validating each row and counting every drop by reason.

A canonical row is `{"messages": [{"role", "content"}, ...]}`: prompt/completion rows become one
user turn and one assistant turn, so one renderer serves every format.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmtune.errors import UserError
from llmtune.recipe.schema import DataSource

ROLES = ("system", "user", "assistant")


@dataclass
class DropReport:
    """Rows dropped per reason, with the first few offending rows (`source:row`) to look at."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"rows": n, "first": self.examples[reason]} for reason, n in self.counts.items()}



class RowError(ValueError):
    """A malformed row; the message is the drop reason."""


def read_source(source: DataSource, base_dir: Path) -> tuple[Iterator[tuple[str, Any]], str]:
    """Raw rows of one source as (`where`, row) pairs, and the source's content fingerprint."""
    if source.hub is not None:
        return _read_hub(source)
    files = _local_files(source.path, base_dir)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return _read_local(files), "sha256:" + digest.hexdigest()


def _local_files(pattern: str, base_dir: Path) -> list[Path]:
    full = Path(pattern).expanduser()
    if not full.is_absolute():
        full = base_dir / full
    files = sorted(Path(p) for p in glob.glob(str(full)))
    if not files:
        raise UserError(f"data: no file matches {pattern} (relative paths start at the recipe's folder, {base_dir})")
    for f in files:
        if f.suffix not in (".jsonl", ".json"):
            raise UserError(f"data: {f}: unsupported file type {f.suffix!r}; use .jsonl or .json")
    return files


def _read_local(files: list[Path]) -> Iterator[tuple[str, Any]]:
    for f in files:
        if f.suffix == ".json":
            try:
                rows = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"data: {f}: not valid JSON ({exc}); a .json source is one list of rows") from None
            if not isinstance(rows, list):
                raise UserError(f"data: {f}: a .json source must hold a list of rows")
            for i, row in enumerate(rows, start=1):
                yield f"{f.name}:{i}", row
            continue
        with f.open("rb") as handle:
            for i, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{f.name}:{i}", json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield f"{f.name}:{i}", RowError("undecodable text (not UTF-8)")
                except json.JSONDecodeError:
                    yield f"{f.name}:{i}", RowError("not valid JSON")


def _read_hub(source: DataSource) -> tuple[Iterator[tuple[str, Any]], str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.hub, source.config, split=source.split)
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise UserError(
            f"data: cannot load hub data set {source.hub!r} (split {source.split!r}): {str(exc).splitlines()[0]}\n"
            "  Without network, use a local file: path: my_data.jsonl"
        ) from None
    rows = ((f"{source.hub}:{i + 1}", row) for i, row in enumerate(ds))
    return rows, f"hub:{source.hub}@{ds._fingerprint}"


def to_canonical(row: Any, source: DataSource) -> list[dict[str, str]] | tuple[str, str]:
    """One raw row as canonical messages, or (text, label) for classification; RowError says what is wrong."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    # Mapped columns win over raw columns that happen to carry a format field's name.
    row = {k: v for k, v in row.items() if k not in source.columns.values()} | {
        field: row.get(column) for field, column in source.columns.items()
    }
    if source.format == "classification":
        label = row.get("label")
        if label is None:
            raise RowError("missing field 'label'")
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise RowError("field 'label' is not a string or integer")
        text = _text(row, "text")
        if not text.strip():
            raise RowError("empty text")
        return text, str(label)
    return _to_messages(row, source)


def _to_messages(row: dict, source: DataSource) -> list[dict[str, str]]:
    if source.format == "prompt_completion":
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    else:
        messages = row.get("messages")
        if messages is None:
            raise RowError("missing field 'messages'")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise RowError("'messages' is not a list of {role, content} objects")
        for m in messages:
            if m.get("role") not in ROLES:
                raise RowError(f"unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str):
                raise RowError("a message's 'content' is missing or not a string")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn to learn from")
    if not messages[-1]["content"].strip() or not any(
        m["content"].strip() for m in messages if m["role"] == "assistant"
    ):
        raise RowError("empty response")
    return messages


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' is not a string")
    if name == "completion" and not value.strip():
        raise RowError("empty response")
    return value
