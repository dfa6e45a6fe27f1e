"""`llmtune eval`: lm-evaluation-harness suites on any model, not only llmtune runs.

The model may be a built-in name, a local folder (full model or PEFT adapter), a hub id, or an
llmtune run directory (its final/ model). Precision and device follow DESIGN.md: bf16 on GPUs that
run it natively, fp32 elsewhere. Results go to an output folder shaped like a run directory's
evaluation: summary.json (eval.tasks.after), results.md, lm_eval's raw results and per-row samples.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

from llmtune.errors import UserError
from llmtune.evaluation.harness import check_tasks, evaluate_suites
from llmtune.evaluation.reports import markdown_table, plot_tasks, print_tasks
from llmtune.evaluation.suites import Suite, load_suite, suite_from_tasks


def resolve_model_source(name: str) -> tuple[Path | str, str]:
    """(what to load, what it is): a run directory becomes its final/ folder."""
    from llmtune.models.load import resolve_model_path

    path = Path(name).expanduser()
    if (path / "recipe.resolved.yaml").is_file():
        if not (path / "final").is_dir():
            raise UserError(f"--model: {name} is an llmtune run without final/ (not finished?); resume it or give another model")
        path = path / "final"
    if path.is_dir():
        return path, "adapter" if (path / "adapter_config.json").is_file() else "model"
    return resolve_model_path(name), "model"


def load_for_eval(name: str, dtype: str = "auto", trust_remote_code: bool = False):
    """Model (adapters attached, not merged) and tokenizer, on this machine's accelerator in DESIGN.md's precision."""
    from llmtune.models.load import load_causal_lm, load_tokenizer, resolve_precision, training_device
    from llmtune.recipe.schema import ModelSection

    source, kind = resolve_model_source(name)
    precision = resolve_precision(dtype)
    if kind == "adapter":
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(str(source), dtype=precision.dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        cfg = ModelSection(name=str(source), dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(cfg, str(source))
        model = load_causal_lm(cfg, str(source), precision)
    return model.to(training_device()).eval(), tokenizer, precision


def run_eval(
    model_name: str,
    suite_names: list[str],
    tasks: list[str],
    limit: int | None,
    include_paths: list[str],
    output: str | None,
    batch_size: int | str = "auto",
    dtype: str = "auto",
) -> dict:
    suites: list[tuple[Suite, Path]] = [load_suite(s) for s in suite_names]
    if tasks:
        suites.append((suite_from_tasks(tasks), Path.cwd()))
    if not suites:
        raise UserError(
            "llmtune eval: name what to evaluate: --suite NAME|FILE and/or --tasks a,b (`llmtune ls` lists the suites)"
        )
    out = Path(output) if output else Path("runs") / f"eval-{Path(model_name).name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    task_manager = check_tasks(suites, [Path(p) for p in include_paths])  # input mistakes surface before the model loads
    model, tokenizer, precision = load_for_eval(model_name, dtype)
    results = evaluate_suites(
        model, tokenizer, suites, limit=limit, batch_size=batch_size, output_dir=out, task_manager=task_manager
    )
    tasks_block = {"after": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_table(tasks_block))
    plot = plot_tasks(tasks_block, out / "plots" / "eval_tasks.png", f"{Path(model_name).name}: evaluation")
    summary = {
        "status": "completed",
        "model": model_name,
        "precision": precision.name,
        "device": str(model.device),
        "suites": [s.name for s, _ in suites],
        "limit": limit,
        "runtime_s": round(time.perf_counter() - t0, 1),
        "eval": {"tasks": tasks_block},
        "plots": [str(plot)] if plot else [],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_tasks(tasks_block)
    return summary | {"output_dir": str(out)}
