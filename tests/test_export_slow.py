"""A run exported to every format from its recipe, each artifact then loaded by a separate Python
process that imports only transformers, as a user would. Slow: `pytest -m slow` (CI runs it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmtune.export.formats import FORMATS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

LOAD_EVERY_FORMAT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
root = sys.argv[1]
out = {}
for fmt in ["merged", "bnb-8bit", "bnb-4bit", "gguf-f16", "gguf-q8_0", "gguf-q4_0"]:
    kwargs = {"gguf_file": "model.gguf"} if fmt.startswith("gguf") else {}
    tokenizer = AutoTokenizer.from_pretrained(f"{root}/{fmt}", **kwargs)
    model = AutoModelForCausalLM.from_pretrained(f"{root}/{fmt}", **kwargs)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Greet Ada number 3."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out[fmt] = model(ids).logits[0, -1].float().tolist()
print(json.dumps(out))
"""


def test_every_format_from_the_recipe_loads_in_plain_transformers(make_recipe, tmp_path):
    path = make_recipe(export={"formats": list(FORMATS)}, train={"max_steps": 4})
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "train", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["export"]) == list(FORMATS)
    for fmt, record in summary["export"].items():
        assert record["ok"], (fmt, record["checks"])
        assert {"README.md", "report.md", "summary.json"} <= {p.name for p in (run_dir / "export" / fmt).iterdir()}
    sizes = {fmt: r["bytes"] for fmt, r in summary["export"].items()}
    assert sizes["gguf-q4_0"] < sizes["gguf-q8_0"] < sizes["gguf-f16"] < sizes["merged"]

    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_EVERY_FORMAT, str(run_dir / "export")], capture_output=True, text=True, timeout=600
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    logits = json.loads(loaded.stdout.strip().splitlines()[-1])
    import torch

    merged = torch.tensor(logits["merged"])
    for fmt, tolerance in {"bnb-8bit": 0.1, "bnb-4bit": 0.5, "gguf-f16": 2e-3, "gguf-q8_0": 0.1, "gguf-q4_0": 0.5}.items():
        assert (torch.tensor(logits[fmt]) - merged).abs().max() < tolerance, fmt
    # f16 moves logits by ~1e-4: the next token cannot change (quantized formats may flip near-ties).
    assert torch.tensor(logits["gguf-f16"]).argmax() == merged.argmax()
