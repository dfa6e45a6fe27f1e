"""Evaluation suites: data files under eval/suites/ naming lm-evaluation-harness tasks and settings.

A suite is a name and a list of tasks; each task says how many few-shot examples, how many rows
and which metrics to report. Tasks are lm_eval's own (built-in names, or YAML files in its task
format under eval/tasks/ or a folder the user adds). `data_files` points any task at local
JSONL files instead of the hub, keeping the task's prompts and metrics.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from llmtune.errors import UserError
from llmtune.recipe.schema import Section

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
EVAL_DIR = PROJECT_ROOT / "eval"
SUITES_DIR = EVAL_DIR / "suites"
TASKS_DIR = EVAL_DIR / "tasks"


class SuiteTask(Section):
    task: str
    """lm_eval task name (built-in, or from eval/tasks/ or an include path)."""
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples in each prompt; unset: the task's own default."""
    limit: int | None = Field(default=None, gt=0)
    """Score at most this many rows of the task (the command line's --limit caps it further)."""
    metrics: list[str] | None = None
    """Metrics to report (lm_eval's names, e.g. acc, acc_norm, exact_match); unset: all the task reports."""
    data_files: dict[str, str] | None = None
    """Read the task's rows from local JSON/JSONL files, by split name ({test: my.jsonl}); relative to the suite file.
    The rows must have the fields the task's prompts use (e.g. the hub data set's own layout)."""


class Suite(Section):
    name: str
    """Suite name (`--suite NAME`)."""
    description: str | None = None
    """One line about what the suite measures."""
    apply_chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template (for chat-tuned models on generation tasks)."""
    tasks: list[SuiteTask] = Field(min_length=1)
    """The tasks, in the order they are reported."""


def load_suite(name_or_file: str, base_dir: Path | None = None) -> tuple[Suite, Path]:
    """A suite by name (eval/suites/NAME.yaml) or by file; returns it with the folder its relative paths start from."""
    path = _find_suite(name_or_file, base_dir)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--suite: {path} is not valid YAML: {exc}") from None
    try:
        return Suite.model_validate(raw), path.parent
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise UserError(f"--suite: {path} is not a valid suite", problems) from None


def suite_from_tasks(names: list[str], limit: int | None = None) -> Suite:
    """An ad-hoc suite of task names (`--tasks a,b`), every metric reported."""
    return Suite(name="tasks", tasks=[SuiteTask(task=n, limit=limit) for n in names])


def list_suites() -> list[Path]:
    return sorted(SUITES_DIR.glob("*.yaml"))


def _find_suite(name_or_file: str, base_dir: Path | None) -> Path:
    candidates = [Path(name_or_file)]
    if base_dir is not None:
        candidates.insert(0, base_dir / name_or_file)
    candidates.append(SUITES_DIR / f"{name_or_file}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(p.stem for p in list_suites())
    raise UserError(f"--suite: no suite {name_or_file!r}; give a suite YAML file or one of: {known}")
