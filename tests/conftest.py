"""Offline fixtures: a tokenizer trained here, a 2-layer Llama built from a config, data written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NAMES = ["Ada", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas"]


def greeting_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        name = NAMES[i % len(NAMES)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Greet {name} number {i}."},
                    {"role": "assistant", "content": f"Hello {name}! You are {i}."},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def preference_rows(n, offset=0):
    # chosen greets by name, rejected is a refusal: a difference even a tiny model learns in a few steps.
    return [
        {"prompt": f"Greet {NAMES[i % 10]} number {i}.", "chosen": f"Hello {NAMES[i % 10]}! You are {i}.", "rejected": "No."}
        for i in range(offset, offset + n)
    ]


def recipe_for(tmp_path, tiny_model_dir, method, rows, fmt, adapter=None, n_train=32, n_held_out=16, eval=None, **train):
    """A loaded recipe training `method` on the tiny model: rows(n_train) to train on, rows(n_held_out, 100)
    held out; keyword arguments replace the train section's defaults."""
    from llmtune.recipe import load_recipe

    data = write_jsonl(tmp_path / "train.jsonl", rows(n_train))
    held_out = write_jsonl(tmp_path / "test.jsonl", rows(n_held_out, 100))
    recipe = {
        "model": {"name": str(tiny_model_dir)},
        "data": {
            "sources": [{"path": str(data), "format": fmt}],
            "eval_sources": [{"path": str(held_out), "format": fmt}],
            "max_length": 64,
        },
        "method": method,
        "adapter": adapter or {"kind": "lora", "r": 4, "alpha": 8},
        "eval": eval or {},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 8,
            "batch_size": 8,
            "learning_rate": 5e-3,
            "seed": 7,
            "save_steps": 4,
        }
        | train,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.dumps(r) for r in greeting_rows(50)] + ["The quick brown fox jumps over the lazy dog.", CHATML]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dir):
    """Write a small recipe for the tiny model; keyword sections are merged over the defaults."""

    def make(**sections) -> Path:
        train = write_jsonl(tmp_path / "train.jsonl", greeting_rows(32))
        test = write_jsonl(tmp_path / "test.jsonl", greeting_rows(6, offset=100))
        recipe = {
            "model": {"name": str(tiny_model_dir)},
            "data": {"sources": [{"path": str(train)}], "eval_sources": [{"path": str(test)}], "max_length": 64},
            "adapter": {"kind": "lora", "r": 4, "alpha": 8},
            "train": {
                "output_dir": str(tmp_path / "run"),
                "max_steps": 6,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "save_steps": 2,
                "save_total_limit": 5,
                "seed": 7,
            },
        }
        for section, values in sections.items():  # an adapter section replaces the default one
            recipe[section] = values if section == "adapter" else recipe.get(section, {}) | values
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return make


@pytest.fixture(autouse=True)
def data_cache_in_tmp(tmp_path, monkeypatch):
    """Each test gets its own tokenized-data cache, so no test reads another's entries."""
    monkeypatch.setattr("llmtune.data.cache.cache_root", lambda: tmp_path / "llmtune-cache")
