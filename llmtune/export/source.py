"""What an export starts from: a run directory, a model directory or a built-in model name.

A run directory's `final/` holds either a PEFT adapter (adapter_config.json) or a full model;
`recipe.resolved.yaml`, `manifest.json` and `summary.json` beside it feed the model card and the
held-out text the verification measures perplexity on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmtune.errors import UserError
from llmtune.models.builtin import BUILTIN_MODELS

# Plain English for the perplexity check when there is no run data to hold out (a model directory
# or a built-in name). Varied on purpose: prose, a list, numbers, a dialogue turn.
SAMPLE_TEXTS = [
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hill behind the church and waited for the rain to stop.",
    "To make a simple bread, mix 500 grams of flour with 10 grams of salt, 7 grams of dry yeast and "
    "350 millilitres of warm water. Knead for ten minutes, let it rise for an hour, then bake at 220 degrees.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to "
    "produce glucose and oxygen. It takes place mainly in the leaves, inside small structures called chloroplasts.",
    "Dear Ms. Novak, thank you for your letter of 12 March. We have checked your account and the "
    "payment was received on time. Please accept our apologies for the reminder you received in error.",
    "The train to Vienna leaves at 9:45 from platform 3. Passengers with bicycles should board the "
    "last carriage, and tickets bought on the train cost an extra five euros.",
    "A good night's sleep helps memory, mood and concentration. Most adults need between seven and "
    "nine hours, and going to bed at the same time every day makes it easier to fall asleep.",
    "Question: What is the capital of France? Answer: The capital of France is Paris, which is also "
    "the country's largest city and lies on the river Seine.",
    "In 1969 two astronauts walked on the Moon while a third stayed in orbit. They collected rocks, "
    "took photographs and left a plaque that says they came in peace for all mankind.",
]


@dataclass
class ExportSource:
    """A resolved export input."""

    name: str  # what the model card calls it
    model_dir: Path  # final/ of a run, or the model directory itself
    base_path: str | None = None  # the base model an adapter applies to (None: model_dir is a full model)
    adapter_kind: str | None = None  # PEFT type of the adapter, lower case (lora, ia3, prefix_tuning, ...)
    run_dir: Path | None = None
    recipe: dict | None = None  # recipe.resolved.yaml, as data
    manifest: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    @property
    def is_adapter(self) -> bool:
        return self.adapter_kind is not None

    @property
    def mergeable(self) -> bool:
        """LoRA (DoRA included) and IA3 fold into the weights; prefix and prompt tuning do not."""
        return self.adapter_kind in ("lora", "ia3")


def resolve_source(spec: str) -> ExportSource:
    from llmtune.models.load import resolve_model_path

    path = Path(spec).expanduser()
    if (path / "recipe.resolved.yaml").is_file():
        return _run_source(path)
    if spec in BUILTIN_MODELS:
        return ExportSource(name=spec, model_dir=Path(resolve_model_path(spec)))
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _adapter_source(path, path.name, None)
        if not (path / "config.json").is_file():
            raise UserError(
                f"export: {path} is neither an llmtune run directory (recipe.resolved.yaml) nor a model "
                "directory (config.json) nor a PEFT adapter (adapter_config.json)"
            )
        return ExportSource(name=path.resolve().name, model_dir=path)
    raise UserError(
        f"export: {spec!r} is not a run directory, a model directory or a built-in model "
        f"({', '.join(BUILTIN_MODELS)}); hub ids are not exported directly: download the model first"
    )


def _run_source(run_dir: Path) -> ExportSource:
    final = run_dir / "final"
    if not final.is_dir():
        raise UserError(
            f"export: {run_dir} has no final/ (the run did not finish); finish it with "
            f"`llmtune train RECIPE train.output_dir={run_dir} --resume`"
        )
    recipe = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    if recipe.get("method", {}).get("kind", "sft") != "sft":
        raise UserError(
            f"export: the run trained method {recipe['method']['kind']}; export covers causal language "
            "models (sft); its final/ already loads with plain transformers/peft"
        )
    _check_gathered(final)
    manifest = _read_json(run_dir / "manifest.json")
    summary = _read_json(run_dir / "summary.json")
    name = recipe.get("name") or run_dir.name
    if (final / "adapter_config.json").is_file():
        source = _adapter_source(final, name, manifest.get("model", {}).get("path") or recipe["model"]["name"])
    else:
        source = ExportSource(name=name, model_dir=final)
    source.run_dir, source.recipe, source.manifest, source.summary = run_dir, recipe, manifest, summary
    return source


def _adapter_source(adapter_dir: Path, name: str, base: str | None) -> ExportSource:
    from llmtune.models.load import resolve_model_path

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"export: {adapter_dir}/adapter_config.json names no base model (base_model_name_or_path)")
    base_path = resolve_model_path(base)
    if not Path(base_path).is_dir():
        raise UserError(f"export: the adapter's base model {base!r} is not on this machine; give a run whose base is local")
    return ExportSource(name=name, model_dir=adapter_dir, base_path=base_path, adapter_kind=config["peft_type"].lower())


def heldout_texts(source: ExportSource, tokenizer, limit: int = 32) -> tuple[list[str], str]:
    """Texts to measure perplexity on, and where they came from.

    A run's own held-out rows (rendered with its chat template) when its data can still be read and
    is unchanged (same fingerprints as in manifest.json); otherwise the built-in English sample.
    """
    if source.recipe is not None:
        rows = _run_heldout_rows(source, tokenizer)
        if rows:
            from llmtune.data.template import render_segments

            chat_template = source.recipe.get("data", {}).get("chat_template", "model")
            texts = ["".join(t for t, _ in render_segments(m, tokenizer, chat_template)) for m in rows[:limit]]
            return texts, f"{len(texts)} held-out rows of the run's data"
    return SAMPLE_TEXTS, f"llmtune's built-in English sample ({len(SAMPLE_TEXTS)} paragraphs)"


def _run_heldout_rows(source: ExportSource, tokenizer) -> list:
    from llmtune.data import prepare_data
    from llmtune.recipe import validate_recipe

    recipe = validate_recipe(source.recipe)
    wanted = source.manifest.get("data_fingerprints", {})
    # Relative data paths were relative to the recipe file: try the folder of the recipe named on the
    # training command line, and the current directory.
    candidates = [Path(arg).parent.resolve() for arg in source.manifest.get("command", []) if arg.endswith((".yaml", ".yml"))]
    for recipe_dir in [*candidates, Path.cwd()]:
        try:
            data = prepare_data(recipe.data, recipe_dir, tokenizer, recipe.train.seed)
        except (UserError, OSError, ValueError):
            continue
        if data.fingerprints == wanted:
            return data.eval_rows
    return []


def _check_gathered(final: Path) -> None:
    """DeepSpeed ZeRO-3 saves empty placeholders unless told to gather the weights on save."""
    from safetensors import safe_open

    for file in final.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
        if empty:
            raise UserError(
                f"export: {file} holds empty tensors ({empty[0]}, ...): the run saved ZeRO-3 shards without "
                "gathering them; set stage3_gather_16bit_weights_on_model_save: true in the DeepSpeed config "
                "and save again (or convert a checkpoint with DeepSpeed's zero_to_fp32.py)"
            )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
