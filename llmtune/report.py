"""The short, readable end-of-run summary printed to the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict) -> None:
    train, evaluation = summary.get("train", {}), summary.get("eval", {})
    table = Table(title=f"llmtune: {summary.get('recipe')}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("run directory", summary.get("run_dir", ""))
    table.add_row("model", f"{summary.get('model')} ({summary.get('precision')})")
    table.add_row("trainable params", f"{train.get('trainable_params', 0):,} of {train.get('total_params', 0):,}")
    table.add_row("steps", str(train.get("steps")))
    if train.get("final_loss") is not None:
        table.add_row("loss", f"{train['first_loss']:.4f} -> {train['final_loss']:.4f}")
    if train.get("tokens_per_s"):
        table.add_row("tokens/s", f"{train['tokens_per_s']:,.0f}")
    table.add_row("wall time", f"{train.get('runtime_s')} s")
    dropped = summary.get("data", {}).get("dropped") or {}
    data = summary.get("data", {})
    table.add_row(
        "rows",
        f"{data.get('train_rows', data.get('rows_streamed'))} train, "
        f"{sum(d['rows'] for d in dropped.values())} dropped" + "".join(f"\n  {r}: {d['rows']}" for r, d in dropped.items()),
    )
    for metric in evaluation.get("after", {}):
        if metric == "n":
            continue
        shown = [_fmt(metric, evaluation[when][metric]) for when in ("before", "after") if when in evaluation]
        table.add_row(metric, f"{' -> '.join(shown)} (n={evaluation['after']['n']})")
    table.add_row("final model", summary.get("final", ""))
    for fmt, info in (summary.get("export") or {}).items():
        status = "verified" if info.get("ok", True) else "VERIFICATION FAILED, see report.md"
        table.add_row(f"export {fmt}", f"{info['path']}  (max |logit diff| {info['max_abs_logit_diff']:.2e}; {status})")
    Console().print(table)


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric in ("exact_match", "accuracy") else f"{value:.3f}"
