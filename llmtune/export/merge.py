"""The full-precision model every export starts from: a trained adapter merged into an fp32 reload
of its base, or a full model as it is.

The merge always happens on a fresh fp32 load of the base, never on the training copy, so a
quantized (QLoRA) or low-precision training base cannot leak into the exported weights: PEFT's
`merge_and_unload` on a 4/8-bit base would re-quantize the merged weights (DESIGN.md's trap).
LoRA, DoRA and IA3 fold into the weights; prefix and prompt tuning add virtual tokens, which are
not weights, so they cannot be merged and are exported as the adapter with a reference to its base.
"""

from __future__ import annotations

import torch

from llmtune.export.source import ExportSource
from llmtune.models.load import Precision, load_causal_lm
from llmtune.recipe.schema import ModelSection

FP32 = Precision(dtype=torch.float32, bf16=False, fp16=False)


def load_trained(source: ExportSource):
    """The model as trained, in fp32 and eval mode: a PeftModel for adapters, else the full model."""
    cfg = _model_section(source)
    if not source.is_adapter:
        return load_causal_lm(cfg, str(source.model_dir), FP32).eval()
    from peft import PeftModel

    base = load_causal_lm(cfg, source.base_path, FP32)
    return PeftModel.from_pretrained(base, source.model_dir).eval()


def merge(trained, source: ExportSource):
    """A plain transformers model with the adapter folded in (the model itself when there is none)."""
    if not source.is_adapter:
        return trained
    assert source.mergeable, "prefix/prompt adapters are exported as adapters, never merged"
    return trained.merge_and_unload()


def _model_section(source: ExportSource) -> ModelSection:
    model = dict((source.recipe or {}).get("model") or {})
    # Never a quantized load here, whatever the training base was.
    return ModelSection(**{**model, "quantization": "none", "dtype": "float32"})
