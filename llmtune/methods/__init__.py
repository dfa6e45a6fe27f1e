"""Training methods: one module per method, each declaring everything the rest of llmtune needs.

A method module `llmtune/methods/<kind>.py` declares, at its top level:

    KIND                    the recipe's `method.kind`
    DESCRIPTION             one line: what it trains on and how (the docs of method.kind)
    FORMATS                 data formats (`data.sources[].format`) it reads
    EXAMPLES                what llmtune.data turns those rows into: "lm" (input_ids + labels),
                            "classification", "preference", "prompt" or "feedback"
    MODEL                   "causal_lm", or "sequence_classifier" (then also `head_labels(data)`: the head's
                            labels; data is None when planning, and None means "known from the data only")
    PACKING_AND_STREAMING   whether its rows may be packed, padding-free or streamed (data.packing, ...)
    WHOLE_WEIGHTS_PER_RANK  True when every rank needs whole weights (refused under DeepSpeed/FSDP)
    REWARD_MODEL_KEY        its option that takes a reward-model folder (a stage's reward_from_stage), or None
    OPTIONS                 its recipe section `method.<kind>` (a Section), or None
    RULES                   cross-field recipe rules: functions recipe -> list of "path.key: problem; fix"
    memory_terms(shape)     per-GPU bytes `llmtune plan` adds for it (heads, references, pairs, logits)
    train(recipe, run, model, tokenizer, data, precision, resume_from) -> (trainer, output)
    evaluates(recipe, data) whether `evaluate` measures anything for this recipe
    evaluate(recipe, run, model, tokenizer, data, when) -> held-out figures, before and after training
    training_figures(run)   figures its own trainer measured during training ({"after": ...}), else {}

The recipe schema is built from these modules, so their top level imports only the standard
library, pydantic, llmtune.recipe.section and llmtune.errors; everything else is imported inside
their functions. Shared Trainer plumbing lives in llmtune.methods.hf_trainer.

METHODS is the one table from kind to module. It lists this package, so a new method is one new
module (with its recipe, test and README row) and no edit anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

PROTOCOL = (
    "KIND",
    "DESCRIPTION",
    "FORMATS",
    "EXAMPLES",
    "MODEL",
    "WHOLE_WEIGHTS_PER_RANK",
    "REWARD_MODEL_KEY",
    "PACKING_AND_STREAMING",
    "OPTIONS",
    "RULES",
    "memory_terms",
    "train",
    "evaluates",
    "evaluate",
    "training_figures",
)
MODELS = ("causal_lm", "sequence_classifier")
EXAMPLE_KINDS = ("lm", "classification", "preference", "prompt", "feedback")


def _method_modules() -> list[ModuleType]:
    modules = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)]
    methods = [m for m in modules if hasattr(m, "KIND")]
    for module in methods:
        missing = [name for name in PROTOCOL if not hasattr(module, name)]
        # The program's own invariant, not a user error: a method module must declare the whole protocol.
        assert not missing, f"{module.__name__} does not declare {', '.join(missing)}"
        assert module.MODEL in MODELS and module.EXAMPLES in EXAMPLE_KINDS, module.__name__
    return methods


# sft first: it is the default kind and the one most recipes use; the rest alphabetically.
METHODS: dict[str, ModuleType] = {m.KIND: m for m in sorted(_method_modules(), key=lambda m: (m.KIND != "sft", m.KIND))}


def method_of(recipe) -> ModuleType:
    """The module of the recipe's method."""
    return METHODS[recipe.method.kind]
