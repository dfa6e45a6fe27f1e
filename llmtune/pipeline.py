"""The readable top: the stages of a run, in order, and nothing else."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from llmtune.data import prepare_data
from llmtune.distributed import is_main_process
from llmtune.errors import GateFailed
from llmtune.evaluation import stage as task_eval
from llmtune.evaluation.reports import print_tasks
from llmtune.export.formats import export_model
from llmtune.launch import shards_weights
from llmtune.methods import method_of
from llmtune.models.adapter import apply_adapter, count_parameters
from llmtune.models.load import (
    for_trainable_weights,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    resolve_model_path,
    resolve_precision,
    training_device,
)
from llmtune.recipe import Recipe
from llmtune.report import print_summary
from llmtune.runs import RunDir, now


@dataclass
class RunResult:
    run: RunDir
    summary: dict
    model: Any = None  # the trained model, still in memory (None when the run had already completed)
    tokenizer: Any = None
    trainer: Any = None  # the method's trainer (tests read e.g. PPO's reference model from it)


def run_recipe(recipe: Recipe, recipe_dir: Path, resume: bool = False) -> RunResult:
    """One training run: prepare data, load, evaluate before, train, evaluate after, summarise, export."""
    if recipe.stages:
        return run_stages(recipe, recipe_dir, resume)
    run = RunDir.for_recipe(recipe, resume)
    previous = run.read_json("summary.json") if resume else None
    if previous and previous.get("status") == "completed":
        print(f"[llmtune] {run.path} already completed; nothing to resume")
        print_summary(previous)
        return RunResult(run, previous)
    run.start(recipe, resume)
    method = method_of(recipe)
    started_at, t0 = now(), time.perf_counter()

    set_seed(recipe.train.seed)  # a new head and the adapter's initial weights are drawn below
    precision = for_trainable_weights(
        resolve_precision(recipe.model.dtype), recipe.adapter.kind in ("full", "freeze") or method.MODEL == "sequence_classifier"
    )
    model_path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(recipe.model, model_path)
    data = prepare_data(recipe.data, recipe_dir, tokenizer, recipe.train.seed, method.EXAMPLES)
    run.write_manifest(recipe, model_path, data.fingerprints, started_at, precision=precision.name)
    model = load_model(method, recipe, model_path, precision, tokenizer, data)

    evaluation, tasks = evaluate_before(method, recipe, recipe_dir, run, model, tokenizer, data)
    model, trainer, output, checkpoint = train(method, recipe, run, model, model_path, tokenizer, data, precision, resume)
    final = run.save_final(trainer, tokenizer)
    if not is_main_process():
        return RunResult(run, {}, trainer.model, tokenizer)  # evaluation, export and reports happen once, on rank 0
    if shards_weights():
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Training is over: without this, from_pretrained (evaluation, merged export) would build models
        # under ZeRO-3's partitioned init, whose collectives wait for ranks that have already finished.
        unset_hf_deepspeed_config()
    trained = (
        _reload_final(method, recipe, final, precision) if shards_weights() and method.evaluates(recipe, data) else trainer.model
    )
    gates = evaluate_after(method, recipe, recipe_dir, run, trained, trainer.model, tokenizer, data, evaluation, tasks)

    summary = summarise(method, recipe, run, data, precision, output, model, checkpoint, final, evaluation, tasks, gates, t0)
    run.update_manifest(ended_at=now())
    run.write_summary(summary)
    summary["export"] = export(recipe, run, data)  # after summary.json exists: each model card reads the run's evaluation there
    print_summary(summary)
    if tasks:
        print_tasks(tasks, gates)
    if gates is not None and not gates["passed"]:
        raise GateFailed(gates["failures"])
    return RunResult(run, summary, trainer.model, tokenizer, trainer)


def load_model(method, recipe: Recipe, model_path: str, precision, tokenizer, data):
    """The base model the method trains: a causal LM, or a sequence classifier with a new head."""
    if method.MODEL == "sequence_classifier":
        model = load_classifier(recipe.model, model_path, precision, method.head_labels(data), tokenizer.pad_token_id)
    else:
        model = load_causal_lm(recipe.model, model_path, precision)
    if recipe.model.quantization == "none" and not shards_weights():
        model.to(training_device())  # evaluate "before" where training will run (bitsandbytes placed itself)
    return model


def evaluate_before(method, recipe: Recipe, recipe_dir: Path, run: RunDir, model, tokenizer, data) -> tuple[dict, dict]:
    """The base model's held-out figures and benchmark tasks (kept from the first attempt when resuming)."""
    evaluation, tasks = {}, {}
    if not (recipe.eval.before_after and is_main_process()):
        return evaluation, tasks
    if method.evaluates(recipe, data):
        evaluation["before"] = run.read_json("eval/before.json") or _held_out(
            method, recipe, run, model, tokenizer, data, "before"
        )
    if task_eval.wants_task_evaluation(recipe):
        tasks["before"] = run.read_json("eval/tasks-before.json") or task_eval.evaluate_stage(
            recipe, recipe_dir, run, model, tokenizer, data, "before"
        )
    return evaluation, tasks


def train(method, recipe: Recipe, run: RunDir, model, model_path: str, tokenizer, data, precision, resume: bool):
    """Apply the adapter and run the method's trainer, from the newest complete checkpoint when resuming."""
    model = apply_adapter(
        model,
        recipe.adapter,
        task="SEQ_CLS" if method.MODEL == "sequence_classifier" else "CAUSAL_LM",
        tokenizer_path=model_path,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
    )
    checkpoint = run.latest_checkpoint() if resume else None
    if resume:
        # Steps logged after the checkpoint (or all of them, if none was complete) will run again.
        print(f"[llmtune] resuming from {checkpoint or 'the start: no complete checkpoint yet'}")
        run.truncate_metrics(after_step=int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    trainer, output = method.train(recipe, run, model, tokenizer, data, precision, str(checkpoint) if checkpoint else None)
    return model, trainer, output, checkpoint


def evaluate_after(
    method, recipe: Recipe, recipe_dir: Path, run: RunDir, trained, in_memory, tokenizer, data, evaluation: dict, tasks: dict
) -> dict | None:
    """The trained model's held-out figures and tasks, beside the base model's; returns the gates' verdict."""
    if method.evaluates(recipe, data):
        evaluation["after"] = _held_out(method, recipe, run, trained, tokenizer, data, "after")
    evaluation |= method.training_figures(run)
    if "before" in evaluation:
        evaluation["delta"] = {
            k: round(evaluation["after"][k] - evaluation["before"][k], 4) for k in evaluation["after"] if k != "n"
        }
    if task_eval.wants_task_evaluation(recipe):
        tasks["after"] = task_eval.evaluate_stage(recipe, recipe_dir, run, in_memory, tokenizer, data, "after")
    for when in ("before", "after"):  # held-out exact match / accuracy join the task table, for gates and reports
        if when in evaluation:
            task_eval.add_heldout(tasks.setdefault(when, {}), evaluation[when], evaluation[when]["n"])
    return task_eval.finish(recipe, run, tasks)


def summarise(
    method,
    recipe: Recipe,
    run: RunDir,
    data,
    precision,
    output,
    model,
    checkpoint,
    final: Path,
    evaluation: dict,
    tasks: dict,
    gates: dict | None,
    t0: float,
) -> dict:
    trainable, total = count_parameters(model)
    metrics = run.read_metrics()
    losses = [r for r in metrics if "loss" in r]
    speeds = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")]
    summary = {
        "status": "completed",
        "recipe": recipe.name,
        "run_dir": str(run.path),
        "model": recipe.model.name,
        "method": method.KIND,
        "adapter": recipe.adapter.kind,
        "precision": precision.name
        + (f", base quantized {recipe.model.quantization}" if recipe.model.quantization != "none" else ""),
        "train": {
            "steps": output.global_step,
            "final_loss": losses[-1]["loss"] if losses else None,
            "first_loss": losses[0]["loss"] if losses else None,
            "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
            "runtime_s": round(time.perf_counter() - t0, 1),
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from": str(checkpoint) if checkpoint else None,
        },
        "data": data.stats,
        "eval": evaluation,
        "final": str(final),
        "export": {},
        "plots": [str(p) for p in [run.plot_loss(), run.plot_eval(evaluation)] if p],
    }
    if tasks:
        summary["eval"]["tasks"] = tasks
        if (run.plots / "eval_tasks.png").is_file():
            summary["plots"].append(str(run.plots / "eval_tasks.png"))
    if gates is not None:
        summary["gates"] = gates
        if not gates["passed"]:
            summary["status"] = "failed"
    return summary


def export(recipe: Recipe, run: RunDir, data) -> dict:
    """Each export format written, reloaded and measured; each records itself in summary.json."""
    exports, reference = {}, {}  # reference: the trained model's figures, measured once for every format
    for fmt in dict.fromkeys((["merged"] if recipe.export.merged else []) + list(recipe.export.formats)):
        exports[fmt] = export_model(run.path, fmt, heldout_rows=data.eval_rows or None, reference_cache=reference)
    return exports


def _held_out(method, recipe: Recipe, run: RunDir, model, tokenizer, data, when: str) -> dict:
    result = method.evaluate(recipe, run, model, tokenizer, data, when)
    run.write_json(f"eval/{when}.json", result)
    return result


def _reload_final(method, recipe: Recipe, final: Path, precision):
    """Under ZeRO-3 or FSDP each rank holds only a shard, so rank 0 alone cannot run the trained
    model; it evaluates final/ instead (gathered on save), loaded the way a user loads it."""
    classifier = method.MODEL == "sequence_classifier"
    if recipe.adapter.kind in ("full", "freeze"):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    else:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        cls = AutoPeftModelForSequenceClassification if classifier else AutoPeftModelForCausalLM
    return cls.from_pretrained(final, dtype=precision.dtype).to(training_device()).eval()


# --- multi-stage pipelines -----------------------------------------------------------------------


def run_stages(recipe: Recipe, recipe_dir: Path, resume: bool = False) -> RunResult:
    """Each stage in order, in its own run directory `<run>/<stage>/`; --resume skips completed stages
    and resumes the first unfinished one from its newest checkpoint."""
    run = RunDir.for_recipe(recipe, resume)
    previous = run.read_json("summary.json") if resume else None
    if previous and previous.get("status") == "completed":
        print(f"[llmtune] {run.path} already completed; nothing to resume")
        return RunResult(run, previous)
    run.start(recipe, resume)
    started_at, t0 = now(), time.perf_counter()
    summaries, result = {}, None
    for i, stage in enumerate(recipe.stages):
        stage_dir = run.path / stage.name
        done = RunDir(stage_dir).read_json("summary.json")
        if done and done.get("status") == "completed":
            print(f"[llmtune] stage {i + 1}/{len(recipe.stages)} {stage.name}: already completed, skipped")
            summaries[stage.name] = done
            continue
        print(f"[llmtune] stage {i + 1}/{len(recipe.stages)}: {stage.name}")
        stage_recipe = recipe.stage_recipe(
            stage,
            str(stage_dir),
            model_name=str(stage_model(run.path / stage.from_stage)) if stage.from_stage else None,
            reward_model=str(run.path / stage.reward_from_stage / "final") if stage.reward_from_stage else None,
        )
        result = run_recipe(stage_recipe, recipe_dir, resume=(stage_dir / "recipe.resolved.yaml").is_file())
        summaries[stage.name] = result.summary
        if i < len(recipe.stages) - 1:
            result = None  # free the stage's model before the next one loads
    summary = {
        "status": "completed",
        "recipe": recipe.name,
        "run_dir": str(run.path),
        "runtime_s": round(time.perf_counter() - t0, 1),
        "started_at": started_at,
        "eval": {name: s.get("eval", {}) for name, s in summaries.items() if s.get("eval")},
        "stages": summaries,
    }
    run.write_summary(summary)
    print(f"[llmtune] pipeline completed: {', '.join(summaries)} in {summary['runtime_s']} s")
    return RunResult(run, summary, *((result.model, result.tokenizer, result.trainer) if result else ()))


def stage_model(stage_dir: Path) -> Path:
    """The full model an earlier stage produced: its final/, its merged export, or (for an adapter)
    a merge of final/ into its base, written once to `<stage>/final-merged/`."""
    final = stage_dir / "final"
    if not (final / "adapter_config.json").is_file():
        return final
    if (stage_dir / "export" / "merged" / "config.json").is_file():
        return stage_dir / "export" / "merged"
    merged = stage_dir / "final-merged"
    if not (merged / "config.json").is_file() and is_main_process():
        import torch
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        model = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32).merge_and_unload()
        model.save_pretrained(merged)
        AutoTokenizer.from_pretrained(final).save_pretrained(merged)
    return merged
