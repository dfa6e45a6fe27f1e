"""The readable top: the stages of a run, in order, and nothing else."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from llmtune.data import describe_drops, prepare_data
from llmtune.errors import GateFailed, UserError
from llmtune.evaluation.classification import classification_metrics
from llmtune.evaluation import stage as task_eval
from llmtune.evaluation.exact_match import exact_match
from llmtune.evaluation.reports import print_tasks
from llmtune.export.formats import export_model
from llmtune.methods.classification import train_classification
from llmtune.methods.dpo import train_dpo
from llmtune.methods.grpo import train_grpo
from llmtune.methods.ppo import train_ppo
from llmtune.methods.reward import train_reward
from llmtune.methods.sft import train_sft
from llmtune.models.adapter import apply_adapter, count_parameters
from llmtune.models.load import (for_trainable_weights, load_causal_lm, load_classifier, load_tokenizer,
                                 resolve_model_path, resolve_precision, training_device)
from llmtune.launch import shards_weights
from llmtune.recipe import Recipe
from llmtune.report import print_summary
from llmtune.runs import RunDir, is_main_process, now

TRAINERS = {"sft": train_sft, "classification": train_classification, "reward": train_reward, "dpo": train_dpo,
            "grpo": train_grpo, "ppo": train_ppo}
SCORING_HEAD = ("classification", "reward")  # methods that train a new sequence-classification head


@dataclass
class RunResult:
    run: RunDir
    summary: dict
    model: Any = None  # the trained model, still in memory (None when the run had already completed)
    tokenizer: Any = None
    trainer: Any = None  # the method's trainer (tests read e.g. PPO's reference model from it)


def run_recipe(recipe: Recipe, recipe_dir: Path, resume: bool = False) -> RunResult:
    if recipe.stages:
        return run_stages(recipe, recipe_dir, resume)
    run = RunDir.for_recipe(recipe, resume)
    previous = run.read_json("summary.json") if resume else None
    if previous and previous.get("status") == "completed":
        print(f"[llmtune] {run.path} already completed; nothing to resume")
        print_summary(previous)
        return RunResult(run, previous)
    run.start(recipe, resume)
    started_at, t0 = now(), time.perf_counter()

    # Model, tokenizer and data
    set_seed(recipe.train.seed)  # a new head and the adapter's initial weights are drawn below
    whole_weights_train = recipe.adapter.kind in ("full", "freeze") or recipe.method.kind in SCORING_HEAD
    precision = for_trainable_weights(resolve_precision(recipe.model.dtype), whole_weights_train)
    model_path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(recipe.model, model_path)
    data = prepare_data(recipe.data, recipe_dir, tokenizer, recipe.train.seed)
    run.write_manifest(recipe, model_path, data.fingerprints, started_at, precision=precision.name)
    if recipe.method.kind == "classification":
        model = load_classifier(recipe.model, model_path, precision, data.label_names, tokenizer.pad_token_id)
    elif recipe.method.kind == "reward":
        model = load_classifier(recipe.model, model_path, precision, ["reward"], tokenizer.pad_token_id)
    else:
        model = load_causal_lm(recipe.model, model_path, precision)
    if recipe.model.quantization == "none" and not shards_weights():
        model.to(training_device())  # evaluate "before" where training will run (bitsandbytes placed itself)

    # Evaluate the base model (kept from the first attempt when resuming)
    evaluation = {}
    if recipe.eval.before_after and is_main_process() and _has_evaluation(recipe, data):
        evaluation["before"] = run.read_json("eval/before.json") or _evaluate(recipe, run, model, tokenizer, data, "before")
    tasks = {}
    if recipe.eval.before_after and is_main_process() and task_eval.wants_task_evaluation(recipe):
        tasks["before"] = run.read_json("eval/tasks-before.json") or task_eval.evaluate_stage(recipe, recipe_dir, run, model, tokenizer, data, "before")

    # Train
    model = apply_adapter(model, recipe.adapter, task="SEQ_CLS" if recipe.method.kind in SCORING_HEAD else "CAUSAL_LM",
                          tokenizer_path=model_path, gradient_checkpointing=recipe.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    checkpoint = run.latest_checkpoint() if resume else None
    if resume:
        # Steps logged after the checkpoint (or all of them, if none was complete) will run again.
        print(f"[llmtune] resuming from {checkpoint or 'the start: no complete checkpoint yet'}")
        run.truncate_metrics(after_step=int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    trainer, output = TRAINERS[recipe.method.kind](recipe, run, model, tokenizer, data, precision,
                                                   str(checkpoint) if checkpoint else None)
    final = run.save_final(trainer, tokenizer)
    if not is_main_process():
        return RunResult(run, {}, trainer.model, tokenizer)  # evaluation, export and reports happen once, on rank 0
    if shards_weights():
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Training is over: without this, from_pretrained (evaluation, merged export) would build models
        # under ZeRO-3's partitioned init, whose collectives wait for ranks that have already finished.
        unset_hf_deepspeed_config()

    # Evaluate the trained model
    if _has_evaluation(recipe, data):
        trained = _reload_final(recipe, final, model_path, precision) if shards_weights() else trainer.model
        evaluation["after"] = _evaluate(recipe, run, trained, tokenizer, data, "after")
    evaluation |= _method_evaluation(recipe, run)
    if "before" in evaluation:
        evaluation["delta"] = {k: round(evaluation["after"][k] - evaluation["before"][k], 4)
                               for k in evaluation["after"] if k != "n"}
    if task_eval.wants_task_evaluation(recipe):
        tasks["after"] = task_eval.evaluate_stage(recipe, recipe_dir, run, trainer.model, tokenizer, data, "after")
    for when in ("before", "after"):  # held-out exact match / accuracy join the task table, for gates and reports
        if when in evaluation:
            task_eval.add_heldout(tasks.setdefault(when, {}), evaluation[when], evaluation[when]["n"])
    gates = task_eval.finish(recipe, run, tasks)

    exports = {}  # filled in after summary.json exists: each export's model card reads the run's evaluation there
    metrics = run.read_metrics()
    losses = [r for r in metrics if "loss" in r]
    speeds = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")]
    summary = {
        "status": "completed",
        "recipe": recipe.name,
        "run_dir": str(run.path),
        "model": recipe.model.name,
        "method": recipe.method.kind,
        "adapter": recipe.adapter.kind,
        "precision": precision.name + (f", base quantized {recipe.model.quantization}" if recipe.model.quantization != "none" else ""),
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
        "export": exports,
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
    run.update_manifest(ended_at=now())
    run.write_summary(summary)

    # Export: each format is written, reloaded and measured, and recorded in summary.json
    reference: dict = {}  # the trained model's figures, measured once for every format
    for fmt in dict.fromkeys((["merged"] if recipe.export.merged else []) + list(recipe.export.formats)):
        exports[fmt] = export_model(run.path, fmt, heldout_rows=data.eval_rows or None, reference_cache=reference)
    print_summary(summary)
    if tasks:
        print_tasks(tasks, gates)
    if gates is not None and not gates["passed"]:
        raise GateFailed(gates["failures"])
    return RunResult(run, summary, trainer.model, tokenizer, trainer)


def _method_evaluation(recipe: Recipe, run: RunDir) -> dict:
    """Held-out figures the alignment methods measure during their own run: a reward model's pairwise
    accuracy and margin; PPO's reward-model score of responses to held-out prompts, before and after."""
    if recipe.method.kind == "reward" and (after := run.read_json("eval/after.json")):
        print(f"[llmtune] held-out pairwise accuracy {after['accuracy']:.1%}, mean margin {after['margin']:.3f} of {after['n']} pairs")
        return {"after": after}
    if recipe.method.kind == "ppo" and (after := run.read_json("eval/reward_after.json")):
        before = run.read_json("eval/reward_before.json")
        print(f"[llmtune] held-out reward {before['reward_mean']:.4f} -> {after['reward_mean']:.4f}, KL to the reference {after['kl']:.3f}")
        return {"before": before, "after": after}
    return {}


def _reload_final(recipe: Recipe, final: Path, model_path: str, precision):
    """Under ZeRO-3 or FSDP each rank holds only a shard, so rank 0 alone cannot run the trained
    model; it evaluates final/ instead (gathered on save), loaded the way a user loads it."""
    if recipe.adapter.kind in ("full", "freeze"):
        if recipe.method.kind == "classification":
            from transformers import AutoModelForSequenceClassification as cls
        else:
            from transformers import AutoModelForCausalLM as cls
        model = cls.from_pretrained(final, dtype=precision.dtype)
    else:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        cls = AutoPeftModelForSequenceClassification if recipe.method.kind == "classification" else AutoPeftModelForCausalLM
        model = cls.from_pretrained(final, dtype=precision.dtype)
    return model.to(training_device()).eval()


def _has_evaluation(recipe: Recipe, data) -> bool:
    if recipe.method.kind in ("reward", "dpo", "grpo", "ppo"):
        return False  # reward and ppo measure themselves (see _method_evaluation)
    if recipe.method.kind == "classification":
        return data.eval is not None
    if recipe.eval.exact_match is not None and not data.eval_rows:
        raise UserError("eval.exact_match: no usable held-out rows (see the drop reasons in the data report)",
                        describe_drops(data.stats["dropped"]))
    return recipe.eval.exact_match is not None


def _evaluate(recipe: Recipe, run: RunDir, model, tokenizer, data, when: str) -> dict:
    if recipe.method.kind == "classification":
        result = classification_metrics(model, tokenizer, data.eval, data.label_names, recipe.train.batch_size,
                                        predictions_path=run.path / "eval" / f"predictions-{when}.jsonl")
        line = f"accuracy {result['accuracy']:.1%}, macro-F1 {result['macro_f1']:.3f}"
    else:
        result = exact_match(model, tokenizer, data.eval_rows, recipe.eval.exact_match, recipe.data.chat_template,
                             generations_path=run.path / "eval" / f"generations-{when}.jsonl", desc=f"exact match ({when})")
        line = f"exact match {result['exact_match']:.1%}"
    run.write_json(f"eval/{when}.json", result)
    print(f"[llmtune] held-out {line} of {result['n']} {when} training")
    return result


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
            stage, str(stage_dir),
            model_name=str(stage_model(run.path / stage.from_stage)) if stage.from_stage else None,
            reward_model=str(run.path / stage.reward_from_stage / "final") if stage.reward_from_stage else None)
        result = run_recipe(stage_recipe, recipe_dir, resume=(stage_dir / "recipe.resolved.yaml").is_file())
        summaries[stage.name] = result.summary
        if i < len(recipe.stages) - 1:
            result = None  # free the stage's model before the next one loads
    summary = {"status": "completed", "recipe": recipe.name, "run_dir": str(run.path),
               "runtime_s": round(time.perf_counter() - t0, 1), "started_at": started_at,
               "eval": {name: s.get("eval", {}) for name, s in summaries.items() if s.get("eval")},
               "stages": summaries}
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
