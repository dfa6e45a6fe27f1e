"""The README's recipe reference, generated from the schema so the two cannot drift.

python -m llmtune.recipe.reference --write README.md
"""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmtune.recipe.load import _model_in
from llmtune.recipe.schema import Recipe

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def render_reference() -> str:
    lines: list[str] = []
    _section(Recipe, "", lines)
    return "\n".join(lines)


def _section(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        if sub is not None and prefix and name in Recipe.model_fields and _model_in(Recipe.model_fields[name].annotation) is sub:
            # A stage's copy of a top-level section: same keys, documented once above.
            rows.append(
                f"| `{prefix}{name}` | section \\| null | `null` | {' '.join(field.description.split())} Same keys as `{name}`. |"
            )
            continue
        if sub is not None and field.annotation is not None:
            nested.append((name, field, sub))
            continue
        rows.append(
            f"| `{prefix}{name}` | {_type(field.annotation)} | {_default(field)} | {' '.join(field.description.split())} |"
        )
    if rows:
        title = [] if prefix else ["### top level", ""]
        lines += [*title, "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for name, field, sub in nested:
        is_list = typing.get_origin(field.annotation) is list
        lines += [f"### `{prefix}{name}`{'[]' if is_list else ''}", "", field.description, ""]
        _section(sub, f"{prefix}{name}{'[]' if is_list else ''}.", lines)


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and origin not in (list, dict):  # a union such as `int | None`
        return " \\| ".join(_type(a) for a in args)
    if annotation is type(None):
        return "null"
    return re.sub(r"typing\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    return f"`{json.dumps(value)}`"


def write_into(path: Path) -> None:
    text = path.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    path.write_text(f"{head}{START}\n{render_reference()}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_into(Path(sys.argv[2]))
    else:
        print(render_reference())
