"""Reports of task results: a markdown table, a before/after chart, a terminal table, and run comparison.

Every function reads the one result layout of llmtune.evaluation.harness:
{stage: {task: {n, num_fewshot, metrics: {metric: {value, stderr, higher_is_better}}}}} with stage
`before` / `after` (and `delta`: {task: {metric: after - before}}).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmtune.errors import UserError


def deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict[str, float]]:
    return {
        task: {
            metric: round(m["value"] - before[task]["metrics"][metric]["value"], 6)
            for metric, m in r["metrics"].items()
            if metric in before.get(task, {}).get("metrics", {})
        }
        for task, r in after.items()
        if task in before
    }


def markdown_table(results: dict[str, dict]) -> str:
    """| task | metric | n | before | after | delta |, values with their standard errors."""
    stages = [s for s in ("before", "after") if s in results]
    head = ["task", "metric", "n", "shots", *stages] + (["delta"] if len(stages) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = results[stages[-1]]
    for task, r in last.items():
        for metric in r["metrics"]:
            cells = [task, metric, str(r.get("n", "")), "" if r.get("num_fewshot") is None else str(r["num_fewshot"])]
            for stage in stages:
                m = results[stage].get(task, {}).get("metrics", {}).get(metric)
                cells.append(_with_stderr(m) if m else "")
            if len(stages) == 2:
                d = results.get("delta", {}).get(task, {}).get(metric)
                cells.append("" if d is None else f"{d:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_stderr(m: dict) -> str:
    return f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m.get("stderr") is not None and not math.isnan(m["stderr"]) else "")


def plot_tasks(results: dict[str, dict], out: Path, title: str) -> Path | None:
    """Bars per task/metric for each stage, with standard-error whiskers. Metrics outside [0, 1]
    (perplexity) are left out: they would flatten every other bar."""
    stages = [s for s in ("before", "after") if s in results]
    if not stages:
        return None
    last = results[stages[-1]]
    keys = [(t, m) for t, r in last.items() for m, v in r["metrics"].items() if 0 <= v["value"] <= 1]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 1.1 * len(keys)), 4.2))
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        values, errors = [], []
        for task, metric in keys:
            m = results[stage].get(task, {}).get("metrics", {}).get(metric) or {"value": 0, "stderr": None}
            values.append(m["value"])
            errors.append(m["stderr"] if m.get("stderr") is not None and not math.isnan(m["stderr"]) else 0)
        bars = ax.bar([j + i * width for j in range(len(keys))], values, width, yerr=errors, capsize=3, label=stage)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(
        [j + width * (len(stages) - 1) / 2 for j in range(len(keys))],
        [f"{t}\n{m}" for t, m in keys],
        fontsize=8,
        rotation=30 if len(keys) > 6 else 0,
    )
    ax.set(ylim=(0, 1.15), title=title)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def print_tasks(results: dict[str, dict], gates: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    stages = [s for s in ("before", "after") if s in results]
    table = Table(title="evaluation", title_justify="left")
    for column in ["task", "metric", "n", *stages] + (["delta"] if len(stages) == 2 else []):
        table.add_column(column)
    for task, r in results[stages[-1]].items():
        for metric in r["metrics"]:
            row = [task, metric, str(r.get("n", ""))]
            row += [_with_stderr(m) if (m := results[s].get(task, {}).get("metrics", {}).get(metric)) else "" for s in stages]
            if len(stages) == 2:
                d = results.get("delta", {}).get(task, {}).get(metric)
                row.append("" if d is None else f"{d:+.4f}")
            table.add_row(*row)
    console = Console()
    console.print(table)
    if gates:
        for line in gates["checked"]:
            console.print(f"gate passed: {line}")
        for line in gates["failures"]:
            console.print(f"[bold red]gate FAILED[/]: {line}")


def load_results(path: str) -> tuple[str, dict[str, dict]]:
    """The final task results of a run directory or `llmtune eval` output folder (or its summary.json)."""
    p = Path(path)
    summary_path = p / "summary.json" if p.is_dir() else p
    if not summary_path.is_file():
        raise UserError(f"--compare: {path} has no summary.json; give an llmtune run directory or `llmtune eval --output` folder")
    summary = json.loads(summary_path.read_text())
    tasks = (summary.get("eval") or {}).get("tasks") or {}
    results = tasks.get("after") or tasks.get("before")
    if not results:
        raise UserError(f"--compare: {summary_path} holds no task results (eval.tasks)")
    return str(summary.get("model") or path), results


def compare(path_a: str, path_b: str) -> list[dict]:
    """Per task and metric present in both: A, B, B - A, and whether the difference exceeds two
    standard errors of the difference (independent samples)."""
    (_, a), (_, b) = load_results(path_a), load_results(path_b)
    rows = []
    for task in a:
        for metric, ma in a[task]["metrics"].items():
            mb = b.get(task, {}).get("metrics", {}).get(metric)
            if mb is None:
                continue
            diff = mb["value"] - ma["value"]
            se = (
                math.sqrt(ma["stderr"] ** 2 + mb["stderr"] ** 2)
                if ma.get("stderr") is not None and mb.get("stderr") is not None
                else None
            )
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "a": ma["value"],
                    "b": mb["value"],
                    "diff": diff,
                    "stderr": se,
                    "significant": bool(se and abs(diff) > 2 * se),
                }
            )
    if not rows:
        raise UserError(f"--compare: {path_a} and {path_b} share no task and metric")
    return rows


def print_comparison(path_a: str, path_b: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"A = {path_a}\nB = {path_b}", title_justify="left")
    for column in ("task", "metric", "A", "B", "B - A", "± (2 s.e.)"):
        table.add_column(column)
    for r in rows:
        mark = " *" if r["significant"] else ""
        table.add_row(
            r["task"],
            r["metric"],
            f"{r['a']:.4f}",
            f"{r['b']:.4f}",
            f"{r['diff']:+.4f}{mark}",
            "" if r["stderr"] is None else f"{2 * r['stderr']:.4f}",
        )
    Console().print(table)
    print("* the difference is larger than two standard errors")
