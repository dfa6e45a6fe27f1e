"""Recipe loading: YAML file + `a.b=c` overrides -> validated, frozen `Recipe`.

Every problem is collected and reported together, each as `path.to.key: message`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmtune.errors import UserError
from llmtune.recipe.schema import Recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read, override and validate a recipe. Returns it with the folder its relative paths start from."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found (`llmtune ls` lists the shipped recipes)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (model, data, train, ...), not a {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, source=str(path)), path.parent.resolve()


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        # A cross-field check may report several problems in one message, one per line.
        problems = _merge_by_path([line for err in exc.errors() for line in format_error(err).splitlines()])
        raise UserError(f"{source}: {len(problems)} problem(s)", problems) from None


def _merge_by_path(problems: list[str]) -> list[str]:
    """One line per key: a union field reports once per member type ("a valid string; a valid list")."""
    merged: dict[str, list[str]] = {}
    for problem in problems:
        path, _, message = problem.partition(": ")
        if message not in merged.setdefault(path, []):
            merged[path].append(message)
    return [f"{path}: {'; '.join(messages)}" if messages != [""] else path for path, messages in merged.items()]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides; the value is typed by the schema field it lands on."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"{item}: overrides look like section.key=value, e.g. train.max_steps=10")
            continue
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = _get(node, part)
            if child is None:
                child = {}
                _set(node, part, child)
            if not isinstance(child, (dict, list)):
                problems.append(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
                break
            node = child
        else:
            _set(node, parts[-1], _parse_value(parts, value))
    if problems:
        raise UserError("overrides: problem(s)", problems)
    return raw


def _get(node: dict | list, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)] if part.isdigit() and int(part) < len(node) else None
    return node.get(part)


def _set(node: dict | list, part: str, value: Any) -> None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise UserError(f"{part}: list index out of range in override")
        node[int(part)] = value
    else:
        node[part] = value


def _parse_value(parts: list[str], value: str) -> Any:
    # A string field keeps the text as written ("null" aside), so `model.name=1e-4` stays a string;
    # anything else is read as YAML so numbers, booleans and lists arrive typed.
    if value != "null" and _field_is_plain_string(parts):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _field_is_plain_string(parts: list[str]) -> bool:
    annotation = _annotation_at(Recipe, [p for p in parts if not p.isdigit()])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation is str or (_is_union(annotation) and args == [str])


def _annotation_at(model: type[BaseModel], parts: list[str]) -> Any:
    annotation: Any = model
    for part in parts:
        model = _model_in(annotation)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


UNION_TAG = re.compile(r"[\[(]|^(str|int|float|bool|dict|list|none)$")
KEY_PATH = re.compile(r"^[a-z_]+(\.[a-z_]+|\[\d+\])+: ")


def format_error(err: dict[str, Any]) -> str:
    # pydantic appends the union member it tried ("str", "list[str]", "function-after[...]"): not a key.
    loc = [str(p) for p in err["loc"] if not UNION_TAG.search(str(p))]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(loc)
    elif err["type"] == "missing":
        message = "required key is missing"
    if not loc or err["type"] == "value_error" and KEY_PATH.match(message):
        return message  # cross-field checks name their own keys
    return f"{_dotted(loc)}: {message}"


def _suggestion(loc: list[str]) -> str:
    parent = _model_in(_annotation_at(Recipe, [p for p in loc[:-1] if not p.isdigit()]))
    if parent is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(parent.model_fields)}"


def _dotted(loc: list[str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
