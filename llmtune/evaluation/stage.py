"""The recipe's evaluation stage beyond held-out exact match: lm_eval suites, held-out perplexity,
sample generations, every-N-steps perplexity, and the report, chart and gates at the end of a run.

Results share one layout (llmtune.evaluation.harness): held-out metrics appear as task `heldout`,
so gates, reports and `llmtune eval --compare` treat them like any benchmark.
"""

from __future__ import annotations

from pathlib import Path

from llmtune.distributed import world_size
from llmtune.evaluation.gates import check_gates
from llmtune.evaluation.harness import evaluate_suites
from llmtune.evaluation.native import PeriodicPerplexity, perplexity, sample_generations, tokenize_held_out
from llmtune.evaluation.reports import deltas, markdown_table, plot_tasks
from llmtune.evaluation.suites import load_suite, suite_from_tasks
from llmtune.recipe import Recipe

HIGHER_IS_BETTER = {"exact_match": True, "accuracy": True, "macro_f1": True, "perplexity": False}


def wants_task_evaluation(recipe: Recipe) -> bool:
    e = recipe.eval
    return bool(e.suites or e.tasks or e.perplexity or e.sample_prompts or e.gates)


def evaluate_stage(recipe: Recipe, recipe_dir: Path, run, model, tokenizer, data, when: str) -> dict[str, dict]:
    """Task results of `model` now (`when` is before or after training); also written to eval/tasks-{when}.json."""
    e = recipe.eval
    results: dict[str, dict] = {}
    suites = [load_suite(s, recipe_dir) for s in e.suites]
    if e.tasks:
        suites.append((suite_from_tasks(e.tasks), recipe_dir))
    if suites:
        print(f"[llmtune] lm-evaluation-harness ({when} training): {', '.join(s.name for s, _ in suites)}")
        results |= evaluate_suites(
            model,
            tokenizer,
            suites,
            limit=e.limit,
            batch_size=e.batch_size,
            tag=when,
            include_paths=[recipe_dir / p for p in e.include_paths],
            output_dir=run.path / "eval",
        )
    if e.perplexity and data.eval_rows:
        ppl = perplexity(model, tokenize_held_out(data.eval_rows, tokenizer, recipe.data.chat_template), recipe.train.batch_size)
        add_heldout(results, {"perplexity": ppl["perplexity"]}, len(data.eval_rows))
        print(f"[llmtune] held-out perplexity {ppl['perplexity']:.3f} over {ppl['tokens']} answer tokens {when} training")
    if e.sample_prompts:
        sample_generations(
            model, tokenizer, e.sample_prompts, recipe.data.chat_template, run.path / "eval" / f"samples-{when}.jsonl"
        )
    run.write_json(f"eval/tasks-{when}.json", results)
    return results


def add_heldout(results: dict[str, dict], flat: dict[str, float], n: int) -> None:
    """Merge flat held-out figures ({exact_match: 0.9, ...}) into the task layout as task `heldout`."""
    entry = results.setdefault("heldout", {"n": n, "num_fewshot": None, "metrics": {}})
    for metric, value in flat.items():
        if metric != "n":
            entry["metrics"][metric] = {
                "value": float(value),
                "stderr": None,
                "higher_is_better": HIGHER_IS_BETTER.get(metric, True),
            }


def finish(recipe: Recipe, run, tasks: dict[str, dict]) -> dict | None:
    """Deltas, eval/results.md, plots/eval_tasks.png and the gates; returns the gates' verdict (None without gates)."""
    if "before" in tasks and "after" in tasks:
        tasks["delta"] = deltas(tasks["before"], tasks["after"])
    if any(tasks.get(s) for s in ("before", "after")):
        (run.path / "eval").mkdir(parents=True, exist_ok=True)
        (run.path / "eval" / "results.md").write_text(markdown_table(tasks))
        plot_tasks(tasks, run.plots / "eval_tasks.png", f"{run.path.name}: evaluation")
    if not recipe.eval.gates:
        return None
    return check_gates(recipe.eval.gates, tasks.get("after", {}), tasks.get("before"))


def periodic_callbacks(recipe: Recipe, run, tokenizer, data) -> list:
    """A held-out perplexity row in metrics.jsonl every eval.every_n_steps steps (single process only:
    a forward pass on rank 0 alone would stall sharded models under ZeRO-3 / FSDP)."""
    if not recipe.eval.every_n_steps or not data.eval_rows:
        return []
    if world_size() > 1:
        print("[llmtune] eval.every_n_steps: skipped in a multi-process run (held-out figures still come at the end)")
        return []
    examples = tokenize_held_out(data.eval_rows, tokenizer, recipe.data.chat_template)
    return [PeriodicPerplexity(run, examples, recipe.eval.every_n_steps, recipe.train.batch_size)]
