"""Base model and tokenizer: hub id, local directory or built-in name; precision per device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmtune.errors import UserError
from llmtune.models.builtin import BUILTIN_MODELS, resolve_builtin
from llmtune.recipe.schema import ModelSection


@dataclass(frozen=True)
class Precision:
    """How a run holds and computes weights: `dtype` for loading, `bf16`/`fp16` for TrainingArguments."""

    dtype: torch.dtype
    bf16: bool
    fp16: bool

    @property
    def name(self) -> str:
        weights = str(self.dtype).removeprefix("torch.")
        autocast = "bfloat16" if self.bf16 else "float16" if self.fp16 else weights
        return weights if autocast == weights else f"{weights} weights, {autocast} autocast"


def resolve_precision(requested: str) -> Precision:
    """`auto`: bf16 on GPUs that run it natively (Ampere and newer), fp32 everywhere else.

    CPUs stay fp32 even with AVX512-BF16: measured on a 2-core Xeon with avx512_bf16, a 135M LoRA
    step took ~100 s under bf16 autocast against 3.2 s in fp32.
    """
    if requested == "auto":
        # including_emulation=False: T4/V100 report bf16 "supported" through slow emulation.
        native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        requested = "bfloat16" if native_bf16 else "float32"
    if requested == "float16" and not torch.cuda.is_available():
        raise UserError("model.dtype: float16 training needs a CUDA GPU; use float32 (or auto) on this machine")
    dtype = getattr(torch, requested)
    return Precision(dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def for_trainable_weights(precision: Precision, whole_weights_train: bool) -> Precision:
    """Weights that train in full are held in fp32 (16-bit autocast still runs the maths): updates
    smaller than bf16's resolution would be lost, and fp16 gradients cannot be unscaled."""
    if whole_weights_train and precision.dtype != torch.float32:
        return Precision(dtype=torch.float32, bf16=precision.bf16, fp16=precision.fp16)
    return precision


def training_device() -> torch.device:
    """This process's accelerator (one per rank under a launcher), or the CPU."""
    from llmtune.distributed import local_rank

    rank = local_rank()
    if torch.cuda.is_available():
        return torch.device("cuda", rank)
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", rank)
    return torch.device("cpu")


def resolve_model_path(name: str) -> str:
    """A built-in name becomes its cached directory; hub ids and local paths pass through."""
    if name in BUILTIN_MODELS:
        return str(resolve_builtin(name))
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(
            f"model.name: {name} is not a directory; give a hub id, a local model folder, or one of: {', '.join(BUILTIN_MODELS)}"
        )
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


def load_tokenizer(cfg: ModelSection, path: str):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, cfg, path)
    if tokenizer.pad_token is None:
        # Padding positions never carry loss (labels are -100 there), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelSection, path: str, precision: Precision):
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, cfg, path, **_model_kwargs(cfg, precision))


def load_classifier(cfg: ModelSection, path: str, precision: Precision, labels: list[str], pad_token_id: int):
    """The base with a new, randomly initialised sequence-classification head over `labels`."""
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(
        AutoModelForSequenceClassification,
        cfg,
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={l: i for i, l in enumerate(labels)},
        **_model_kwargs(cfg, precision),
    )
    model.config.pad_token_id = pad_token_id  # the head reads the last non-padding token of each row
    return model


def _model_kwargs(cfg: ModelSection, precision: Precision) -> dict:
    kwargs = {"dtype": precision.dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization != "none":
        kwargs["quantization_config"] = bnb_config(cfg.quantization, precision)
        # bitsandbytes places the weights at load time; each rank on its own GPU.
        kwargs["device_map"] = {"": training_device()}
    return kwargs


def bnb_config(quantization: str, precision: Precision):
    """bitsandbytes settings for a QLoRA base: nf4 with double quantization, or LLM.int8()."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # missing, or built without support for this machine
        raise UserError(
            f"model.quantization: {quantization} needs a working bitsandbytes ({exc}); "
            "pip install bitsandbytes, or set model.quantization: none"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=precision.dtype
    )


def _from_pretrained(cls, cfg: ModelSection, path: str, **kwargs):
    try:
        return cls.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except OSError as exc:
        raise UserError(
            f"model.name: cannot load {cfg.name!r}: {str(exc).splitlines()[0]}\n"
            "  Give a local model folder, a built-in name (`llmtune ls`), or a hub id reachable from this machine."
        ) from None
