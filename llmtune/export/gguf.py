"""GGUF export with the `gguf` package's writer: no llama.cpp build needed.

Supported: the Llama, Mistral and Qwen2 families with a byte-level BPE tokenizer (GPT-2 style:
Llama 3, Qwen2, SmolLM, Mistral's tekken). SentencePiece tokenizers (Llama 2, Mistral v0.1-v0.3)
are refused with a message: their GGUF form needs scores and byte tokens that a tokenizer.json
does not carry faithfully.

What llama.cpp's convert_hf_to_gguf.py does, and we do the same way:
- tensor names from gguf's own name map (`gguf.get_tensor_name_map`);
- Llama/Mistral q and k projections permuted into llama.cpp's rotary layout (transformers undoes
  this on load; Qwen2 is written as is);
- 1-D tensors (norms, biases) stay F32; 2-D weights take the format's type; in `gguf-q4_0` the
  token embedding and output head stay Q8_0, as llama.cpp keeps them above 4 bits;
- a vocabulary padded to the embedding's rows with UNUSED `[PAD<i>]` tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llmtune.errors import UserError

GGUF_FORMATS = ("gguf-f16", "gguf-q8_0", "gguf-q4_0")
# model_type -> the architecture name llama.cpp writes (Mistral is a Llama to llama.cpp).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def _types():
    import gguf

    Q = gguf.GGMLQuantizationType
    # format -> (type of 2-D weights, type of embedding/output head, llama.cpp file type)
    return {
        "gguf-f16": (Q.F16, Q.F16, gguf.LlamaFileType.MOSTLY_F16),
        "gguf-q8_0": (Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "gguf-q4_0": (Q.Q4_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    }


def check_gguf_supported(config, tokenizer_dir: Path) -> None:
    """Raise UserError when this model or tokenizer cannot be written as GGUF here."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"--format gguf: model type {model_type!r} is not supported; GGUF export covers "
            f"{', '.join(ARCHITECTURES)} (use --format merged or bnb-8bit/bnb-4bit for this model)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("--format gguf: Llama/Mistral models with attention or MLP biases are not supported")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"--format gguf: rope scaling {rope.get('rope_type')!r} is not supported by this writer; "
            "export --format merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    model = _tokenizer_json(tokenizer_dir).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(
            "--format gguf: only byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM) are supported; "
            "this one is SentencePiece-style. Export --format merged and convert with llama.cpp"
        )


@torch.no_grad()
def write_gguf(state_dict: dict[str, torch.Tensor], config, tokenizer_dir: Path, out_file: Path, fmt: str, name: str) -> dict:
    """Write `state_dict` (a full-precision causal LM's) as one GGUF file; returns per-type tensor counts."""
    import gguf
    from tqdm.auto import tqdm

    check_gguf_supported(config, tokenizer_dir)
    weight_type, head_type, file_type = _types()[fmt]
    arch_name = ARCHITECTURES[config.model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    tmp = out_file.with_name(out_file.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch_name)
    _add_hyperparameters(writer, config, name, file_type)
    _add_tokenizer(writer, config, tokenizer_dir)

    counts: dict[str, int] = {}
    for hf_name, tensor in tqdm(list(state_dict.items()), desc=f"writing {fmt}", unit="tensor", leave=False):
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reads the head from token_embd
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is None:
            if "rotary_emb" in hf_name:
                continue  # computed buffers, not weights
            raise UserError(f"--format gguf: no GGUF name for tensor {hf_name} of this {config.model_type} model")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch_name == "llama" and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            data = permute_for_rope(data, heads)
        qtype = _tensor_type(gguf_name, data, weight_type, head_type)
        stored = gguf.quants.quantize(data, qtype) if qtype != gguf.GGMLQuantizationType.F32 else data
        writer.add_tensor(f"{gguf_name}.{suffix}", stored, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    return counts


def expected_weight(data: np.ndarray, gguf_name: str, fmt: str) -> np.ndarray:
    """What a reader gets back for a full-precision tensor after this format's quantization round trip."""
    import gguf

    weight_type, head_type, _ = _types()[fmt]
    qtype = _tensor_type(gguf_name, data, weight_type, head_type)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    return gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)


def gguf_tensor_name(hf_name: str, config) -> str | None:
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCHITECTURES[config.model_type])
    base, _, suffix = hf_name.rpartition(".")
    found = gguf.get_tensor_name_map(arch, config.num_hidden_layers).get_name(base)
    return f"{found}.{suffix}" if found else None


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_type(gguf_name: str, data: np.ndarray, weight_type, head_type):
    import gguf

    if data.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = head_type if gguf_name.split(".")[0] in ("token_embd", "output") else weight_type
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16  # rows that do not fill whole blocks (llama.cpp falls back too)
    return qtype


def _rope(config) -> dict:
    # transformers 5 keeps rope settings in rope_parameters; older configs use rope_theta/rope_scaling.
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _add_hyperparameters(writer, config, name: str, file_type) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # A Mistral is written as a Llama, as llama.cpp does, and loads back as LlamaForCausalLM (the same
    # computation; the sliding window is dropped, as llama.cpp drops it). transformers would read the
    # name "mistral" as a MistralForCausalLM, but then fails to map its tensors (no "mistral" in gguf-py's
    # architecture names), so the name is never exactly "mistral".
    writer.add_name(name if name.lower() != "mistral" else f"{name}-model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, config, tokenizer_dir: Path) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tokenizer.get_vocab()  # byte-level spelling (e.g. "Ġthe"), as GGUF stores it
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    size = max(config.vocab_size, len(vocab))
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str())))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf's SpecialVocab reads merges, special token ids, add_bos/eos and the chat template the way
    # llama.cpp's converter does.
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=size)
    special.add_to_gguf(writer, quiet=True)


# Pre-tokenizer regexes llama.cpp names (and transformers' GGUF loader knows), by the pattern in tokenizer.json.
_QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE ("gpt-2" when it is GPT-2's own split).

    A split transformers' GGUF loader does not know falls back to GPT-2's; the tokenizer
    round trip in the verification says whether that matters for this vocabulary.
    """
    text = json.dumps(tokenizer_json.get("pre_tokenizer") or {})
    if json.dumps(_QWEN2_PATTERN)[1:-1] in text:  # the pattern as JSON spells it
        return "qwen2"
    if json.dumps(_LLAMA3_PATTERN)[1:-1] in text:
        return "llama-bpe"
    if '"Digits"' in text:
        return "smollm"
    return "gpt-2"


def _tokenizer_json(tokenizer_dir: Path) -> dict:
    """The tokenizer as transformers builds it for this model (which may differ from tokenizer.json:
    transformers 5 gives e.g. a Qwen2 model its Qwen2 pre-tokenizer whatever the file says)."""
    from transformers import AutoTokenizer

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise UserError(f"--format gguf: {tokenizer_dir} has no tokenizer.json (a fast tokenizer is needed to write GGUF)")
    return json.loads(AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.to_str())
