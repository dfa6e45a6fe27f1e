"""Read data sources as raw rows, each with where it came from (`file:row`), and fingerprint them.

Local files are read lazily, row by row (JSONL, JSON, CSV, Parquet; globs of them), so a bad row is
reported with its row number and never stops the others; hub data sets go through `datasets`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.data.formats import RowError
from llmtune.errors import UserError
from llmtune.recipe.schema import DataSource

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class DropReport:
    """Rows dropped per reason, with the first few offending rows (`source:row`) to look at."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    seen: set = field(default_factory=set)

    def add(self, reason: str, where: str) -> None:
        if (reason, where) in self.seen:  # a streamed source can be read more than once; a row counts once
            return
        self.seen.add((reason, where))
        self.counts[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"rows": n, "first": self.examples[reason]} for reason, n in self.counts.items()}


def read_source(
    source: DataSource, base_dir: Path, streaming: bool = False, fingerprint: bool = True
) -> tuple[Iterator[tuple[str, Any]], str | None]:
    """Raw rows of one source as (`where`, row) pairs, and the source's content fingerprint
    (None when not asked for: hashing reads every byte of the files once more).

    `streaming` matters for hub sources only: local files are always read row by row."""
    if source.hub is not None:
        return _read_hub(source, streaming)
    files = _local_files(source.path, base_dir)
    if not fingerprint:
        return _read_local(files), None
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as handle:  # in chunks: a source may be larger than memory
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return _read_local(files), "sha256:" + digest.hexdigest()


def _local_files(pattern: str, base_dir: Path) -> list[Path]:
    full = Path(pattern).expanduser()
    if not full.is_absolute():
        full = base_dir / full
    files = sorted(Path(p) for p in glob.glob(str(full)))
    if not files:
        raise UserError(f"data: no file matches {pattern} (relative paths start at the recipe's folder, {base_dir})")
    for f in files:
        if f.suffix not in FILE_TYPES:
            raise UserError(f"data: {f}: unsupported file type {f.suffix!r}; use one of {', '.join(FILE_TYPES)}")
    return files


def _read_local(files: list[Path]) -> Iterator[tuple[str, Any]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    for f in files:
        yield from readers[f.suffix](f)


def _read_jsonl(f: Path) -> Iterator[tuple[str, Any]]:
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


def _read_json(f: Path) -> Iterator[tuple[str, Any]]:
    try:
        rows = json.loads(f.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"data: {f}: not valid UTF-8 JSON ({exc}); a .json source is one list of rows (use .jsonl for one row per line)"
        ) from None
    if not isinstance(rows, list):
        raise UserError(f"data: {f}: a .json source must hold a list of rows")
    for i, row in enumerate(rows, start=1):
        yield f"{f.name}:{i}", row


def _read_csv(f: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV file with a header line; `where` is the row's line number (the header is line 1)."""
    undecodable: set[int] = set()

    def lines():
        with f.open("rb") as raw:
            for number, line in enumerate(raw, start=1):
                try:
                    yield line.decode("utf-8")
                except UnicodeDecodeError:
                    undecodable.add(number)
                    yield line.decode("utf-8", errors="replace")

    reader = csv.DictReader(lines())
    try:
        for row in reader:
            where = f"{f.name}:{reader.line_num}"
            if reader.line_num in undecodable:
                yield where, RowError("undecodable text (not UTF-8)")
            elif None in row or None in row.values():
                yield where, RowError("CSV row does not have as many fields as the header")
            else:
                yield where, row
    except csv.Error as exc:
        raise UserError(f"data: {f}:{reader.line_num}: not valid CSV ({exc})") from None


def _read_parquet(f: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a Parquet file, read one record batch at a time (never the whole file at once)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for a damaged file
        raise UserError(f"data: {f}: not a readable Parquet file ({exc})") from None
    i = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield f"{f.name}:{i}", row


def _read_hub(source: DataSource, streaming: bool) -> tuple[Iterator[tuple[str, Any]], str]:
    import datasets

    try:
        ds = datasets.load_dataset(source.hub, source.config, split=source.split, streaming=streaming)
    except Exception as exc:  # datasets raises many types for "not reachable / not found"
        raise UserError(
            f"data: cannot load hub data set {source.hub!r} (split {source.split!r}): {str(exc).splitlines()[0]}\n"
            "  Without network, use a local file: path: my_data.jsonl"
        ) from None
    rows = ((f"{source.hub}:{i + 1}", row) for i, row in enumerate(ds))
    # A streamed hub data set has no content hash before it is read; its name and split identify it.
    fingerprint = f"hub:{source.hub}/{source.config}/{source.split}" if streaming else f"hub:{source.hub}@{ds._fingerprint}"
    return rows, fingerprint
