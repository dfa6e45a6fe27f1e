"""Cross-field recipe rules: one named function per rule, each returning its problems.

A problem reads `path.to.key: what is wrong; the fix`. Rules that concern one method live in that
method's module (its RULES) and run after these; the stage rules run last. `check_rules` is what
the schema calls after every section has validated on its own, so `llmtune validate` reports every
problem at once, and a recipe it passes is one `train` accepts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtune.recipe.schema import Recipe

MERGEABLE = ("lora", "ia3")  # adapters whose weights merge into the base


def check_rules(recipe: Recipe) -> list[str]:
    from llmtune.methods import METHODS

    problems: list[str] = []
    for rule in (*RULES, *METHODS[recipe.method.kind].RULES):
        problems += rule(recipe)
    if recipe.stages:
        problems += stages_fit_together(recipe)
    return problems


def _method(recipe: Recipe):
    from llmtune.methods import METHODS

    return METHODS[recipe.method.kind]


def _has_held_out_rows(recipe: Recipe) -> bool:
    return bool(recipe.data.eval_sources) or recipe.data.eval_fraction > 0


# --- evaluation ----------------------------------------------------------------------------------


def perplexity_needs_held_out_rows(recipe: Recipe) -> list[str]:
    if (recipe.eval.perplexity or recipe.eval.every_n_steps) and not _has_held_out_rows(recipe):
        return ["eval.perplexity: needs held-out rows; set data.eval_sources or data.eval_fraction > 0"]
    return []


def gates_on_measured_figures(recipe: Recipe) -> list[str]:
    # Held-out figures are only measured when asked for; a gate on one that is not would fail the run
    # after all of its training.
    e = recipe.eval
    measured = {"perplexity": e.perplexity, "exact_match": e.exact_match is not None}
    problems = []
    for i, gate in enumerate(e.gates):
        if gate.task == "heldout" and not measured.get(gate.metric, True):
            fix = "eval.perplexity: true" if gate.metric == "perplexity" else "an eval.exact_match section"
            problems.append(f"eval.gates[{i}]: heldout/{gate.metric} is not measured by this recipe; add {fix}")
    return problems


def regression_gates_need_the_base(recipe: Recipe) -> list[str]:
    if any(g.max_regression is not None for g in recipe.eval.gates) and not recipe.eval.before_after:
        return ["eval.gates: max_regression compares with the base model; set eval.before_after: true"]
    return []


def exact_match_needs_held_out_rows(recipe: Recipe) -> list[str]:
    if recipe.eval.exact_match and not _has_held_out_rows(recipe):
        return ["eval.exact_match: needs held-out rows; set data.eval_sources or data.eval_fraction > 0"]
    return []


def exact_match_needs_chat_rows(recipe: Recipe) -> list[str]:
    method = _method(recipe)
    if recipe.eval.exact_match and method.EXAMPLES != "lm" and method.MODEL == "causal_lm":
        return [
            f"eval.exact_match: scores answers to held-out chat rows; method.kind {method.KIND} reads "
            f"{' or '.join(method.FORMATS)} rows; remove it"
        ]
    return []


# --- launch and export ---------------------------------------------------------------------------


def num_processes_needs_a_config(recipe: Recipe) -> list[str]:
    if recipe.launch.num_processes and not recipe.launch.accelerate_config:
        return ["launch.num_processes: needs launch.accelerate_config (the launch it configures)"]
    return []


def merged_export_needs_merge_weights(recipe: Recipe) -> list[str]:
    if not recipe.export.merged or _method(recipe).MODEL != "causal_lm" or recipe.adapter.kind in MERGEABLE:
        return []  # a scoring-head method says what its final/ is in its own rules
    why = "final/ is already a full model" if recipe.adapter.kind in ("full", "freeze") else "virtual tokens are not weights"
    return [f"export.merged: adapter kind {recipe.adapter.kind} cannot be merged ({why}); remove it"]


def virtual_tokens_cannot_be_quantized(recipe: Recipe) -> list[str]:
    if recipe.adapter.kind in ("prefix", "prompt") and set(recipe.export.formats) - {"merged"}:
        return [
            f"export.formats: a {recipe.adapter.kind} adapter cannot be merged into its base (virtual tokens are not "
            "weights), so it cannot be quantized either; keep only `merged` (it exports the adapter with a "
            "reference to its base)"
        ]
    return []


def export_formats_once(recipe: Recipe) -> list[str]:
    if len(set(recipe.export.formats)) != len(recipe.export.formats):
        return ["export.formats: a format is listed twice; list each once"]
    return []


# --- model and adapter ---------------------------------------------------------------------------


def prefix_without_gradient_checkpointing(recipe: Recipe) -> list[str]:
    if recipe.adapter.kind == "prefix" and recipe.train.gradient_checkpointing:
        return [
            "adapter.kind: prefix tuning cannot run with gradient checkpointing (PEFT's cached prefix "
            "key/values do not survive recomputation); set train.gradient_checkpointing: false"
        ]
    return []


def quantized_base_trains_lora(recipe: Recipe) -> list[str]:
    if recipe.model.quantization != "none" and recipe.adapter.kind != "lora":
        return [
            f"model.quantization: a quantized base trains through LoRA adapters only (QLoRA), "
            f"not adapter kind {recipe.adapter.kind}; set adapter.kind: lora or model.quantization: none"
        ]
    return []


# --- data ----------------------------------------------------------------------------------------


def formats_fit_the_method(recipe: Recipe) -> list[str]:
    method = _method(recipe)
    problems = []
    for where, sources in (("data.sources", recipe.data.sources), ("data.eval_sources", recipe.data.eval_sources)):
        for i, source in enumerate(sources):
            if source.format not in method.FORMATS:
                problems.append(
                    f"{where}[{i}].format: method.kind {method.KIND} reads "
                    f"{' or '.join(method.FORMATS)} rows, not {source.format}"
                )
    return problems


def streaming_fits_the_method(recipe: Recipe) -> list[str]:
    problems = []
    if recipe.data.streaming and not _method(recipe).PACKING_AND_STREAMING:
        problems.append(f"data.streaming: streams sft rows only, not {recipe.method.kind}; set data.streaming: false")
    if recipe.data.streaming and not recipe.train.max_steps:
        problems.append("data.streaming: a stream has no known length; set train.max_steps")
    return problems


def packing_fits_the_method(recipe: Recipe) -> list[str]:
    if not (recipe.data.packing or recipe.data.padding_free):
        return []
    if not _method(recipe).PACKING_AND_STREAMING:
        return [f"data.packing: packing and padding_free apply to sft, not {recipe.method.kind}; remove them"]
    if recipe.adapter.kind in ("prefix", "prompt"):
        return [
            f"data.packing: {recipe.adapter.kind} tuning prepends virtual tokens to each row, which "
            "packed examples would share; set data.packing and data.padding_free to false"
        ]
    return []


RULES = (
    perplexity_needs_held_out_rows,
    gates_on_measured_figures,
    regression_gates_need_the_base,
    exact_match_needs_held_out_rows,
    num_processes_needs_a_config,
    merged_export_needs_merge_weights,
    virtual_tokens_cannot_be_quantized,
    export_formats_once,
    prefix_without_gradient_checkpointing,
    quantized_base_trains_lora,
    formats_fit_the_method,
    streaming_fits_the_method,
    packing_fits_the_method,
    exact_match_needs_chat_rows,
)


# --- multi-stage pipelines -----------------------------------------------------------------------


def stages_fit_together(recipe: Recipe) -> list[str]:
    """Unique names, references to earlier stages only, a reward model where one is read, and each
    stage's own full recipe valid."""
    from pydantic import ValidationError

    from llmtune.methods import METHODS
    from llmtune.recipe.load import format_error

    problems, kinds = [], {}
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if stage.name in kinds:
            problems.append(f"{where}.name: {stage.name!r} is used by an earlier stage; stage names must be unique")
        for key in ("from_stage", "reward_from_stage"):
            ref = getattr(stage, key)
            if ref is not None and ref not in kinds:
                problems.append(f"{where}.{key}: {ref!r} is not an earlier stage (earlier: {', '.join(kinds) or 'none'})")
        kind = (stage.method or recipe.method).kind
        takes_reward_model = METHODS[kind].REWARD_MODEL_KEY is not None
        try:
            recipe.stage_recipe(stage, where, reward_model="<stage>" if stage.reward_from_stage and takes_reward_model else None)
        except ValidationError as exc:
            problems += [f"{where}." + line for err in exc.errors() for line in format_error(err).splitlines()]
            kinds[stage.name] = None
            continue
        if stage.reward_from_stage and kinds.get(stage.reward_from_stage, "reward") != "reward":
            problems.append(
                f"{where}.reward_from_stage: stage {stage.reward_from_stage!r} trains "
                f"{kinds[stage.reward_from_stage]}, not a reward model"
            )
        if stage.reward_from_stage and not takes_reward_model:
            readers = " and ".join(k for k, m in METHODS.items() if m.REWARD_MODEL_KEY)
            problems.append(f"{where}.reward_from_stage: only {readers} stages use a reward model, not {kind}")
        earlier = METHODS.get(kinds.get(stage.from_stage) or "")
        if stage.from_stage and earlier and earlier.MODEL != "causal_lm" and METHODS[kind].MODEL == "causal_lm":
            problems.append(f"{where}.from_stage: stage {stage.from_stage!r} trains a scoring head, not a language model")
        kinds[stage.name] = kind
    return problems
