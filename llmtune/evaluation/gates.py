"""Gates: minimum (or maximum) values per task and metric, or a largest regression against the base.

A failed gate marks the run failed (summary.json `status: failed`, `gates.failures`) and the CLI
exits with code 3, so a pipeline can stop a model that got worse.
"""

from __future__ import annotations

from llmtune.recipe.schema import GateSection


def check_gates(gates: list[GateSection], after: dict[str, dict], before: dict[str, dict] | None = None) -> dict:
    """{"passed": bool, "checked": [line, ...], "failures": [line, ...]}; one line per condition."""
    checked, failures = [], []
    for gate in gates:
        name = f"{gate.task}/{gate.metric}"
        value = _value(after, gate.task, gate.metric)
        if value is None:
            failures.append(f"{name}: not measured (the evaluated tasks and metrics are: {', '.join(_names(after)) or 'none'})")
            continue
        if gate.min is not None:
            (checked if value >= gate.min else failures).append(f"{name} = {value:.4g}, minimum {gate.min:.4g}")
        if gate.max is not None:
            (checked if value <= gate.max else failures).append(f"{name} = {value:.4g}, maximum {gate.max:.4g}")
        if gate.max_regression is not None:
            base = _value(before or {}, gate.task, gate.metric)
            if base is None:
                failures.append(f"{name}: max_regression needs the base model's figure (eval.before_after: true)")
                continue
            higher_is_better = after[gate.task]["metrics"][gate.metric].get("higher_is_better", True)
            regression = (base - value) if higher_is_better else (value - base)
            line = f"{name} = {value:.4g} against base {base:.4g}: regression {regression:.4g}, allowed {gate.max_regression:.4g}"
            (checked if regression <= gate.max_regression else failures).append(line)
    return {"passed": not failures, "checked": checked, "failures": failures}


def _value(results: dict[str, dict], task: str, metric: str) -> float | None:
    entry = results.get(task, {}).get("metrics", {}).get(metric)
    return None if entry is None else entry["value"]


def _names(results: dict[str, dict]) -> list[str]:
    return [f"{task}/{metric}" for task, r in results.items() for metric in r.get("metrics", {})]
