"""Benchmark suites on lm-evaluation-harness, run on the model in memory (adapters included).

lm_eval computes every figure: `simple_evaluate` on an `HFLM` wrapped around our model and
tokenizer. What llmtune adds is around it: suites as data, local data files for hub tasks, a
clear message when the hub is unreachable, one result layout (task -> metric -> value, stderr)
shared by reports, gates and `llmtune eval --compare`, and RNG isolation so that evaluating the
base model does not change how training draws its random numbers.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from llmtune.errors import UserError
from llmtune.evaluation.suites import TASKS_DIR, Suite, SuiteTask

# Batch size on CPUs when `auto` is asked: lm_eval's detection starts at max_batch_size with the
# model's full context length (8192 tokens for SmolLM2), which on a CPU takes minutes or exhausts
# memory instead of failing fast the way CUDA does.
CPU_BATCH_SIZE = 8


def evaluate_suites(
    model,
    tokenizer,
    suites: list[tuple[Suite, Path]],
    *,
    limit: int | None = None,
    include_paths: list[Path] = (),
    batch_size: int | str = "auto",
    output_dir: Path | None = None,
    tag: str = "",
    task_manager=None,
) -> dict[str, dict]:
    """Run every task of every suite through lm_eval.

    Returns {task: {n, num_fewshot, metrics: {metric: {value, stderr, higher_is_better}}}}.

    `limit` caps every task's own limit. Raw lm_eval results and per-row samples go to `output_dir` when given.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_manager = task_manager or check_tasks(suites, include_paths)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=resolve_batch_size(batch_size, model), max_batch_size=64)
    results: dict[str, dict] = {}
    try:
        for suite, base_dir in suites:
            for (num_fewshot, task_limit), tasks in _groups(suite, limit):
                specs = [_task_spec(task_manager, t, base_dir) for t in tasks]
                with _quiet_lm_eval(), _rng_preserved():
                    raw = _simple_evaluate(
                        lm_eval, lm, specs, tasks, task_manager, num_fewshot, task_limit, suite.apply_chat_template
                    )
                for task in tasks:
                    results[task.task] = _task_result(raw, task)
                if output_dir is not None:
                    _write_raw(raw, output_dir, tag)
    finally:
        model.train(was_training)
    return results


def check_tasks(suites: list[tuple[Suite, Path]], include_paths: list[Path] = ()):
    """Every task known, its local files found, its hub data reachable (or cached): checked before any
    model loads. Returns the lm_eval TaskManager to evaluate with."""
    task_manager = _task_manager(include_paths)
    for suite, base_dir in suites:
        specs = [_task_spec(task_manager, t, base_dir) for t in suite.tasks]
        _check_hub_reachable(task_manager, specs, suite.tasks)
    return task_manager


def resolve_batch_size(batch_size: int | str, model) -> int | str:
    """`auto`: lm_eval's own detection on accelerators (largest batch that fits), CPU_BATCH_SIZE on a CPU."""
    if batch_size != "auto":
        return int(batch_size)
    return CPU_BATCH_SIZE if model.device.type == "cpu" else "auto"


def _task_manager(include_paths: list[Path]):
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path: {path} is not a folder of lm_eval task YAML files")
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)])


def _groups(suite: Suite, limit: int | None) -> list[tuple[tuple[int | None, int | None], list[SuiteTask]]]:
    """Tasks sharing few-shot count and limit go through one simple_evaluate call (its settings are per call)."""
    groups: dict[tuple, list[SuiteTask]] = {}
    for task in suite.tasks:
        task_limit = min(x for x in (task.limit, limit) if x is not None) if (task.limit or limit) else None
        groups.setdefault((task.num_fewshot, task_limit), []).append(task)
    return list(groups.items())


def _task_spec(task_manager, task: SuiteTask, base_dir: Path) -> str | dict:
    """The task's name, or its full config with data files made absolute when they are local."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm_eval's own TaskManager uses

    entry = task_manager.task_index.get(task.task)
    if entry is None:
        close = difflib.get_close_matches(task.task, task_manager.all_tasks, n=3)
        raise UserError(
            f"task {task.task!r}: lm_eval knows no such task"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + " (task YAML files of your own: --include-path DIR, or a suite's data_files)"
        )
    if entry.yaml_path is None or entry.kind.name not in ("TASK", "PY_TASK"):
        if task.data_files:
            raise UserError(
                f"task {task.task}: data_files applies to a single YAML task, not a group or tag; "
                "list the group's tasks one by one with their own data_files"
            )
        return task.task
    config = load_yaml(entry.yaml_path, resolve_func=True)
    yaml_dir = Path(entry.yaml_path).parent
    if task.data_files:
        files = {split: str(_resolve(path, base_dir)) for split, path in task.data_files.items()}
        scored = config.get("test_split") or config.get("validation_split")
        if len(files) == 1:  # one file: it is the split the task scores, whatever its name
            files = {scored: next(iter(files.values()))}
        elif scored not in files:
            raise UserError(f"task {task.task}: data_files has splits {sorted(files)}, but the task scores split {scored!r}")
        config |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}
        for key in ("validation_split", "training_split", "fewshot_split"):
            if config.get(key) and config[key] not in files:
                config.pop(key)  # a split the local files do not have
        return config
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config.get("dataset_path") in ("json", "csv", "parquet", "text") and data_files:
        # lm_eval reads relative data files from the working directory; llmtune from the task file's folder.
        resolved = (
            {k: str(_resolve(v, yaml_dir)) for k, v in data_files.items()}
            if isinstance(data_files, dict)
            else str(_resolve(data_files, yaml_dir))
        )
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
        return config
    return task.task


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (base_dir / p) if (base_dir / p).exists() or not p.exists() else p.resolve()


def _simple_evaluate(lm_eval, lm, specs, tasks: list[SuiteTask], task_manager, num_fewshot, limit, chat: bool) -> dict:
    try:
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=True,
            apply_chat_template=chat,
            bootstrap_iters=1000,
        )
    except Exception as exc:
        if _is_hub_unreachable(exc):
            names = ", ".join(t.task for t in tasks)
            raise UserError(
                _hub_message(names, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            ) from None
        raise
    if raw is None:
        raise RuntimeError("lm_eval returned no results (a non-zero rank of a distributed run?)")
    return raw


LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _check_hub_reachable(task_manager, specs: list, tasks: list[SuiteTask]) -> None:
    """Fail in seconds, not after minutes of download retries, when a task's data must come from an
    unreachable hub and is not in the local HF cache."""
    from lm_eval.tasks._yaml_loader import load_yaml

    needs = []
    for spec, task in zip(specs, tasks):
        if isinstance(spec, dict):
            path = spec.get("dataset_path")
        else:
            entry = task_manager.task_index[task.task]
            path = (
                load_yaml(entry.yaml_path, resolve_func=False).get("dataset_path")
                if entry.yaml_path and entry.kind.name == "TASK"
                else None
            )
            path = path or task.task  # a group or tag: its tasks' data sets are not known here, so probe anyway
        if path not in LOCAL_BUILDERS and not Path(path).expanduser().exists() and not _in_hf_cache(path):
            needs.append(task.task)
    if needs and not _hub_reachable():
        raise UserError(_hub_message(", ".join(needs), "no connection to the hub, and the data set is not in the local HF cache"))


def _in_hf_cache(dataset_path: str) -> bool:
    import os

    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub"))
    return (datasets_cache / dataset_path.replace("/", "___")).is_dir() or (
        hub_cache / f"datasets--{dataset_path.replace('/', '--')}"
    ).is_dir()


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _hub_message(names: str, why: str) -> str:
    return (
        f"task {names}: its data set comes from the Hugging Face hub, which cannot be reached from here ({why})\n"
        "  Run where the hub is reachable (or with the data set in the local HF cache), or point the task "
        "at local files: `data_files: {test: FILE.jsonl}` in a suite, or a task YAML with `dataset_path: json` "
        "given through --include-path (see eval/README.md)."
    )


def _is_hub_unreachable(exc: BaseException) -> bool:
    """Datasets and huggingface_hub fail in several ways without network; all of them end up here."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        text = str(exc).lower()
        if names & {
            "ConnectionError",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
            "DatasetNotFoundError",
            "HfHubHTTPError",
            "Timeout",
            "ConnectTimeout",
            "ProxyError",
        }:
            return True
        if any(s in text for s in ("offline mode", "couldn't reach", "connection", "hf_datasets_offline", "network")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _task_result(raw: dict, task: SuiteTask) -> dict:
    row = raw["results"].get(task.task)
    if row is None:
        raise RuntimeError(f"lm_eval returned no results for {task.task}")
    higher = raw.get("higher_is_better", {}).get(task.task, {})
    metrics = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else key
        if task.metrics is not None and metric not in task.metrics and name not in task.metrics:
            continue
        if not isinstance(value, (int, float)):
            continue
        stderr = row.get(f"{metric}_stderr,{filt}")
        metrics[name] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": higher.get(metric, True),
        }
    if task.metrics:
        missing = [m for m in task.metrics if m not in {k.split(",")[0] for k in metrics} | set(metrics)]
        if missing:
            raise UserError(
                f"task {task.task}: metrics {missing} are not reported by lm_eval for it; it reports "
                f"{sorted({k.split(',')[0] for k in row if ',' in k and '_stderr' not in k})}"
            )
    n_samples = raw.get("n-samples", {})
    if task.task in n_samples:
        n = n_samples[task.task]["effective"]
    else:  # a group: the rows of its subtasks
        n = sum(n_samples.get(sub, {}).get("effective", 0) for sub in raw.get("group_subtasks", {}).get(task.task, []))
    return {"n": n, "num_fewshot": raw.get("n-shot", {}).get(task.task), "metrics": metrics}


def _write_raw(raw: dict, output_dir: Path, tag: str) -> None:
    from lm_eval.utils import handle_non_serializable

    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    for task, rows in (raw.get("samples") or {}).items():
        with (output_dir / f"samples-{task}{suffix}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    kept = {
        k: raw[k]
        for k in (
            "results",
            "groups",
            "group_subtasks",
            "configs",
            "versions",
            "n-shot",
            "higher_is_better",
            "n-samples",
            "lm_eval_version",
            "transformers_version",
        )
        if k in raw
    }
    path = output_dir / f"lm_eval{suffix}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in kept.items():  # several simple_evaluate calls (one per few-shot setting) share one file
        previous[key] = {**previous.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(previous, indent=2, default=handle_non_serializable))


@contextlib.contextmanager
def _rng_preserved():
    """simple_evaluate seeds python, numpy and torch (fixed seeds, for its few-shot sampling); put the
    caller's generators back afterwards, so a run draws the same adapter weights and data order with
    or without a `before` evaluation."""
    import numpy as np

    state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm_eval logs a warning per default it fills in (aggregation, higher_is_better, ...); keep errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def flatten(results: dict[str, dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(task, metric): {value, stderr, higher_is_better}}."""
    return {(task, metric): m for task, r in results.items() for metric, m in r["metrics"].items()}
