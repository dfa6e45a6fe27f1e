"""The recipe schema: one typed, frozen section per stage of the data flow.

Every field's default lives here and nowhere else, and the docstring under each field is its
documentation: `llmtune validate`, the README's recipe reference and error messages all read it.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from llmtune.recipe.section import Section

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelSection(Section):
    name: str = DEFAULT_MODEL
    """Hub id, local directory, or built-in name (`llmtune ls` lists the built-ins)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight and compute precision; `auto` is bf16 on GPUs that run it natively, fp32 elsewhere."""
    trust_remote_code: bool = False
    """Allow the model repository to run its own Python code (only for repositories you trust)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    """Attention kernel; unset lets transformers choose (sdpa where available)."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Load the frozen base quantized with bitsandbytes for QLoRA: `4bit` (nf4, double quantization) or `8bit`."""


FORMATS = (
    "messages",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "text",
    "preference",
    "prompt_only",
    "classification",
    "feedback",
)


class DataSource(Section):
    path: str | None = None
    """Local file or glob: .jsonl, .json (one list of rows), .csv (with a header) or .parquet; relative paths
    start at the recipe's folder."""
    hub: str | None = None
    """Hub data set id, loaded with `datasets.load_dataset` (needs network or a local HF cache)."""
    config: str | None = None
    """Hub data set configuration name, if it has several."""
    split: str = "train"
    """Split to read from a hub source (e.g. `test` in data.eval_sources for a named held-out split)."""
    format: Literal[FORMATS] = "messages"
    """Row layout: `messages` ({role, content} list), `sharegpt` (conversations of {from, value}), `alpaca`
    (instruction, input, output), `prompt_completion`, `text` (continued pre-training), `preference` (prompt,
    chosen, rejected as text or messages; or two full transcripts, hh-rlhf style), `prompt_only` (prompt),
    `classification` (text, label) or `feedback` (prompt, completion as text or messages, label true/false)."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Rename source columns to the format's field names, e.g. {prompt: question, completion: answer}."""
    max_samples: int | None = Field(default=None, gt=0)
    """Use at most this many rows of the source (after shuffling)."""
    weight: float | None = Field(default=None, gt=0)
    """Mixture weight: with weights on the sources, rows are drawn in these proportions (e.g. 0.7 and 0.3)
    and the counts drawn are reported; sources without a weight are used whole."""

    @model_validator(mode="after")
    def _exactly_one_location(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (a local file) or `hub` (a hub data set id)")
        return self


class DataSection(Section):
    sources: list[DataSource] = Field(min_length=1)
    """Training data: one or more sources, concatenated (or mixed by weight) and shuffled with `train.seed`."""
    eval_sources: list[DataSource] = Field(default_factory=list)
    """Held-out data for evaluation; if empty, `eval_fraction` of the training rows is held out."""
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of training rows held out for evaluation when `eval_sources` is empty."""
    mixture_size: int | None = Field(default=None, gt=0)
    """Rows drawn in all when sources have weights; unset: as many as the sources allow without repeating a row
    (larger values repeat rows of the sources that run short, and the report says so)."""
    max_length: int = Field(default=1024, gt=0)
    """Longest tokenized example kept; longer rows are dropped and counted (`text` rows are cut into pieces instead)."""
    chat_template: str = "model"
    """`model` (the tokenizer's own), a named template (`chatml`, `llama3`, `zephyr`), a .jinja file, or `none`
    (plain prompt + completion + EOS). The template used is saved with the tokenizer in final/."""
    loss_on: Literal["assistant", "last_turn", "all"] = "assistant"
    """Tokens that carry loss: every `assistant` turn (with its end-of-turn marker; the completion for
    prompt/completion rows), the `last_turn` only, or `all` tokens including prompts."""
    packing: bool = False
    """Pack several examples into each max_length row (best-fit decreasing) with position ids restarting
    per example, so examples never attend to each other; no padding is computed."""
    padding_free: bool = False
    """Without packing: concatenate each batch into one row instead of padding it (same isolation as packing).
    Needs `model.attn_implementation: flash_attention_2`; with other kernels rows are padded as usual."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding; the order is still seeded)."""
    dedup: bool = False
    """Drop exact duplicate rows (after format conversion), counted in the report."""
    streaming: bool = False
    """Read, check and tokenize training rows only as training consumes them (sources larger than memory);
    needs train.max_steps and data.eval_sources; shuffles through a buffer of `shuffle_buffer` rows."""
    shuffle_buffer: int = Field(default=10_000, gt=0)
    """streaming: rows held in the seeded shuffle buffer."""
    cache: bool = True
    """Reuse tokenized data from an earlier run with the same sources, tokenizer, template and settings."""
    strict: bool = False
    """Fail the run (exit 2) on the first malformed row instead of dropping and reporting it."""

    @model_validator(mode="after")
    def _data_checks(self) -> DataSection:
        problems = []
        if self.packing and self.padding_free:
            problems.append("data.padding_free: packing is already padding-free; set only data.packing")
        if self.group_by_length and (self.packing or self.padding_free):
            problems.append("data.group_by_length: has no effect with packing or padding_free; remove it")
        weighted = [s.weight is not None for s in self.sources]
        if any(weighted) and not all(weighted):
            problems.append("data.sources: give every source a weight, or none")
        if self.streaming:
            for name in ("eval_fraction", "mixture_size", "dedup", "packing"):
                if getattr(self, name):
                    problems.append(
                        f"data.{name}: not available with data.streaming (it needs every row in memory); "
                        "remove it" + (" and give data.eval_sources" if name == "eval_fraction" else "")
                    )
            if any(weighted):
                problems.append("data.sources: mixture weights are not available with data.streaming; remove them")
        if self.mixture_size and not any(weighted):
            problems.append("data.mixture_size: needs weights on data.sources")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class _MethodSectionBase(Section):
    @model_validator(mode="after")
    def _sections_fit_the_kind(self):
        # As for adapters: a method section changed from its default for another kind is an error.
        from llmtune.methods import METHODS

        wrong = [
            f"method.{name}: applies to kind {name} only, not {self.kind}; remove it"
            for name, method in METHODS.items()
            if method.OPTIONS is not None and name != self.kind and getattr(self, name) != method.OPTIONS()
        ]
        if wrong:
            raise ValueError("\n".join(wrong))
        return self


def _method_section() -> type[Section]:
    """The `method` section, assembled from the method modules: `kind` names one of them, and each
    method with options has its own subsection `method.<kind>` (llmtune/methods/<kind>.py)."""
    from llmtune.methods import METHODS

    kinds = "; ".join(f"`{kind}`: {method.DESCRIPTION}" for kind, method in METHODS.items())
    fields: dict = {"kind": (Literal[tuple(METHODS)], Field(default="sft", description=f"Training method. {kinds}."))}
    for kind, method in METHODS.items():
        if method.OPTIONS is not None:
            doc = " ".join((method.OPTIONS.__doc__ or "").split())
            fields[kind] = (method.OPTIONS, Field(default_factory=method.OPTIONS, description=f"kind {kind}: {doc}"))
    return create_model("MethodSection", __base__=_MethodSectionBase, __module__=__name__, **fields)


MethodSection = _method_section()


class AdapterSection(Section):
    kind: Literal["lora", "full", "freeze", "prefix", "prompt", "ia3"] = "lora"
    """What trains: `lora` adapters (QLoRA with model.quantization), `full` (every weight), `freeze`
    (every weight outside the frozen part), `prefix` or `prompt` tuning (virtual tokens), or `ia3`."""
    r: int = Field(default=16, gt=0)
    """lora: rank."""
    alpha: float = Field(default=32, gt=0)
    """lora: scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """lora: dropout on the adapter input."""
    use_rslora: bool = False
    """lora: rank-stabilised scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """lora: weight-decomposed LoRA (DoRA): a trained magnitude per output feature as well."""
    target_modules: str | list[str] | None = None
    """lora, ia3: `all-linear`, `attention` (q/k/v/o projections) or module-name patterns; unset: `all-linear`
    for LoRA, PEFT's per-architecture default for IA3."""
    feedforward_modules: list[str] | None = None
    """ia3: which of target_modules are feed-forward (scaled on their input); unset: PEFT's default."""
    modules_to_save: list[str] = Field(default_factory=list)
    """lora, ia3: modules trained in full and saved beside the adapter (e.g. a new head)."""
    trainable: list[str] = Field(default_factory=list)
    """freeze: train only parameters whose names match one of these regular expressions."""
    freeze_embeddings: bool = False
    """freeze: freeze the input embeddings (and the output head when it shares their weights)."""
    freeze_layers: int = Field(default=0, ge=0)
    """freeze: freeze the first N transformer layers."""
    num_virtual_tokens: int = Field(default=20, gt=0)
    """prefix, prompt: virtual tokens prepended to every sequence."""
    prefix_projection: bool = False
    """prefix: reparameterise the prefix through a two-layer MLP (more parameters, often steadier)."""
    prompt_init_text: str | None = None
    """prompt: initialise the virtual tokens from this text's embeddings; unset: random."""

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> AdapterSection:
        # A default value is never "set for another kind", so recipe.resolved.yaml (which spells out
        # every default) validates again, and an override can switch kinds.
        wrong = [
            f"adapter.{name}: applies to kind {' or '.join(sorted(kinds))} only, not {self.kind}; remove it"
            for name, kinds in ADAPTER_FIELD_KINDS.items()
            if self.kind not in kinds
            and getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True)
        ]
        if self.kind == "freeze" and not (self.trainable or self.freeze_embeddings or self.freeze_layers):
            wrong.append("adapter.kind: freeze needs adapter.trainable patterns, freeze_embeddings or freeze_layers")
        if self.trainable and (self.freeze_embeddings or self.freeze_layers):
            wrong.append("adapter.trainable: give either trainable patterns or freeze_embeddings/freeze_layers, not both")
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as exc:
                wrong.append(f"adapter.trainable: {pattern!r} is not a valid regular expression ({exc})")
        if wrong:
            raise ValueError("\n".join(wrong))
        return self


# Which adapter kinds read each kind-specific field: a field set for another kind is an error,
# not silently ignored.
ADAPTER_FIELD_KINDS = {
    "r": {"lora"},
    "alpha": {"lora"},
    "dropout": {"lora"},
    "use_rslora": {"lora"},
    "use_dora": {"lora"},
    "target_modules": {"lora", "ia3"},
    "feedforward_modules": {"ia3"},
    "modules_to_save": {"lora", "ia3"},
    "trainable": {"freeze"},
    "freeze_embeddings": {"freeze"},
    "freeze_layers": {"freeze"},
    "num_virtual_tokens": {"prefix", "prompt"},
    "prefix_projection": {"prefix"},
    "prompt_init_text": {"prompt"},
}


class TrainSection(Section):
    output_dir: str | None = None
    """Run directory; default `runs/<recipe name>-<timestamp>`."""
    max_steps: int | None = Field(default=None, gt=0)
    """Optimizer steps to run; overrides `epochs` when set."""
    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training data (when `max_steps` is unset)."""
    batch_size: int = Field(default=8, gt=0)
    """Examples per device per forward pass."""
    grad_accum: int = Field(default=1, gt=0)
    """Forward passes accumulated per optimizer step."""
    learning_rate: float = Field(default=2e-4, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup: float = Field(default=0.0, ge=0)
    """Warmup: a fraction of all steps when below 1, else a number of steps."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradient clipping norm."""
    optimizer: str = "adamw_torch"
    """Optimizer name as transformers knows it (adamw_torch, adamw_torch_fused, paged_adamw_8bit, ...)."""

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        from transformers.training_args import OptimizerNames

        known = [o.value for o in OptimizerNames]
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise ValueError(
                f"unknown optimizer {name!r}" + (f"; did you mean {close[0]!r}?" if close else f"; one of {', '.join(known)}")
            )
        return name

    seed: int = 42
    """Seed for initialisation, data order and dropout; same seed, same run."""
    logging_steps: int = Field(default=1, gt=0)
    """Write a metrics.jsonl row every this many steps."""
    save_steps: int = Field(default=50, gt=0)
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int = Field(default=2, gt=0)
    """Keep only this many newest checkpoints."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    dataloader_num_workers: int = Field(default=0, ge=0)
    """Worker processes for data loading (0 loads in the training process)."""


class ExactMatchSection(Section):
    max_new_tokens: int = Field(default=64, gt=0)
    """Longest greedy generation per held-out prompt."""
    limit: int | None = Field(default=None, gt=0)
    """Score at most this many held-out rows."""
    batch_size: int = Field(default=32, gt=0)
    """Prompts generated together (larger is faster until memory runs out)."""


class GateSection(Section):
    task: str
    """lm_eval task name, or `heldout` for the held-out metrics (exact_match, perplexity)."""
    metric: str
    """Metric name as reported (e.g. acc, acc_norm, exact_match, perplexity)."""
    min: float | None = None
    """Fail the run when the trained model's value is below this."""
    max: float | None = None
    """Fail the run when the trained model's value is above this (for lower-is-better metrics such as perplexity)."""
    max_regression: float | None = Field(default=None, ge=0)
    """Fail the run when the value is worse than the base model's by more than this (needs eval.before_after)."""

    @model_validator(mode="after")
    def _some_condition(self) -> GateSection:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError("a gate needs min, max or max_regression")
        return self


class EvalSection(Section):
    exact_match: ExactMatchSection | None = None
    """Greedy-generate each held-out prompt and score exact match with its reference answer."""
    before_after: bool = False
    """Also evaluate the base model before training, and report both with their difference."""
    suites: list[str] = Field(default_factory=list)
    """lm-evaluation-harness suites: names under eval/suites/ (`llmtune ls`) or suite YAML files (relative to the recipe)."""
    tasks: list[str] = Field(default_factory=list)
    """Further lm_eval task names, every metric reported."""
    limit: int | None = Field(default=None, gt=0)
    """Score at most this many rows of each suite task."""
    include_paths: list[str] = Field(default_factory=list)
    """Folders of task YAML files in lm_eval's format (relative to the recipe), beside eval/tasks/."""
    batch_size: int | Literal["auto"] = "auto"
    """lm_eval batch size; `auto`: lm_eval's largest-that-fits search on GPUs, 8 on CPUs."""
    perplexity: bool = False
    """Perplexity of the held-out answers (the tokens that carry loss), reported as task `heldout`."""
    every_n_steps: int | None = Field(default=None, gt=0)
    """Log held-out perplexity to metrics.jsonl every this many training steps (single-process runs)."""
    sample_prompts: list[str] = Field(default_factory=list)
    """Prompts answered greedily before and after training, written to eval/samples-{before,after}.jsonl."""
    gates: list[GateSection] = Field(default_factory=list)
    """Conditions the trained model must meet; a failed gate marks the run failed (exit code 3)."""


ExportFormat = Literal["merged", "bnb-8bit", "bnb-4bit", "gguf-f16", "gguf-q8_0", "gguf-q4_0"]


class ExportSection(Section):
    merged: bool = False
    """Write `export/merged/`: adapters merged into a full-precision copy of the base, verified (same as `formats: [merged]`)."""
    formats: list[ExportFormat] = Field(default_factory=list)
    """Artifacts written to `export/<format>/` after training, each reloaded and measured against the trained
    model (perplexity change, top-1 agreement, model card): `merged`, `bnb-8bit`, `bnb-4bit`, `gguf-f16`,
    `gguf-q8_0`, `gguf-q4_0` (see Export)."""


class LaunchSection(Section):
    accelerate_config: str | None = None
    """A shipped accelerate config by name (multi_gpu, deepspeed_zero2, deepspeed_zero3, fsdp2, ...; `llmtune ls`) or a file
    (relative to the recipe); when set, the run re-executes itself under `accelerate launch` (`--accelerate-config` wins)."""
    num_processes: int | None = Field(default=None, gt=0)
    """Processes to launch in all; default: one per visible GPU (the config's own count on CPUs); `--num-processes` wins."""


class StageSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Stage name; also its subdirectory of the run directory."""
    from_stage: str | None = None
    """Train the model an earlier stage produced (merged when it is an adapter) instead of model.name."""
    reward_from_stage: str | None = None
    """ppo, grpo: score with the reward model an earlier `reward` stage trained."""
    method: MethodSection | None = None
    """This stage's method section (replaces the recipe's)."""
    adapter: AdapterSection | None = None
    """This stage's adapter section (replaces the recipe's)."""
    data: DataSection | None = None
    """This stage's data section (replaces the recipe's)."""
    train: TrainSection | None = None
    """This stage's train section (replaces the recipe's; output_dir is always `<run>/<stage name>`)."""
    eval: EvalSection | None = None
    """This stage's eval section (replaces the recipe's)."""
    export: ExportSection | None = None
    """This stage's export section (replaces the recipe's)."""


STAGE_SECTIONS = ("method", "adapter", "data", "train", "eval", "export")


class Recipe(Section):
    name: str | None = None
    """Run name used for the default run directory; default: the recipe file's name."""
    description: str | None = None
    """One line about what the recipe does."""
    model: ModelSection = Field(default_factory=ModelSection)
    """Base model, tokenizer and precision."""
    data: DataSection
    """Where training and evaluation rows come from and how they are rendered."""
    method: MethodSection = Field(default_factory=MethodSection)
    """Training objective."""
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    """Which parameters are trained."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Optimisation, checkpoints and the run directory."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Evaluation before and after training."""
    export: ExportSection = Field(default_factory=ExportSection)
    """Artifacts written after training."""
    launch: LaunchSection = Field(default_factory=LaunchSection)
    """How the run is launched (one process, or several through Accelerate)."""
    stages: list[StageSection] = Field(default_factory=list)
    """A multi-stage pipeline (e.g. sft -> reward -> ppo), run in order; empty: one training run.
    Each stage is this recipe with the sections the stage gives replacing the top-level ones, and
    writes its own run directory under this run's: `<run>/<stage name>/`."""

    def stage_recipe(
        self, stage: StageSection, output_dir: str, model_name: str | None = None, reward_model: str | None = None
    ) -> Recipe:
        """The full recipe of one stage: sections the stage gives replace this recipe's own; the
        stage trains `model_name` (an earlier stage's model) and scores with `reward_model` when given."""
        raw = self.model_dump(exclude={"stages"})
        raw |= {
            section: getattr(stage, section).model_dump() for section in STAGE_SECTIONS if getattr(stage, section) is not None
        }
        raw["name"] = f"{self.name}-{stage.name}" if self.name else stage.name
        raw["train"]["output_dir"] = output_dir
        if model_name:
            raw["model"]["name"] = model_name
        if reward_model:
            from llmtune.methods import METHODS

            kind = raw["method"]["kind"]
            key = METHODS[kind].REWARD_MODEL_KEY  # the stage checks refuse reward_from_stage for a method without one
            options = raw["method"][kind]
            options[key] = [*options[key], reward_model] if isinstance(options[key], list) else reward_model
        return Recipe.model_validate(raw)

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        from llmtune.recipe.rules import check_rules

        problems = check_rules(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self
