"""Merged export: adapters folded into a full-precision reload of the base, checked by logits.

The merge always happens on a fresh fp32 load of the base, never on the training copy, so a
quantized or low-precision training base cannot leak into the exported weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from llmtune.data.template import prompt_text
from llmtune.models.load import Precision, load_causal_lm, load_tokenizer, resolve_model_path
from llmtune.recipe import Recipe

FP32 = Precision(dtype=torch.float32, bf16=False, fp16=False)


@torch.no_grad()
def export_merged(adapter_dir: Path, out_dir: Path, recipe: Recipe, sample_conversations: list | None) -> dict:
    from peft import PeftModel

    base_path = resolve_model_path(recipe.model.name)
    tokenizer = load_tokenizer(recipe.model, str(adapter_dir))
    # Never merge into a 4/8-bit base: that would quantize the merged weights too (DESIGN.md's trap).
    unquantized = recipe.model.model_copy(update={"quantization": "none"})
    adapted = PeftModel.from_pretrained(load_causal_lm(unquantized, base_path, FP32), adapter_dir).eval()

    texts = [prompt_text(c, tokenizer, recipe.data.chat_template) for c in (sample_conversations or [])[:4]]
    inputs = tokenizer(texts or ["The quick brown fox jumps over the lazy dog."], return_tensors="pt", padding=True)
    adapter_logits = adapted(**inputs).logits
    merged = adapted.merge_and_unload()

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    # The check is on what a user will load: the merged model read back from disk.
    reloaded = load_causal_lm(unquantized, str(out_dir), FP32).eval()
    diff = (reloaded(**inputs).logits - adapter_logits).abs().max().item()
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    return {"path": str(out_dir), "bytes": size, "max_abs_logit_diff": diff}
