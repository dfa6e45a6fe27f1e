"""The model card (README.md in the export directory) and the verification report (report.md).

The card is what a person deploying the artifact reads first: where it came from (base model,
method, data fingerprints, recipe), how well it did (the run's evaluation), and what the export
cost, as measured, not as claimed.
"""

from __future__ import annotations

import json

from llmtune.export.source import ExportSource

FORMAT_NOTES = {
    "merged": "Full-precision (fp32) safetensors with the adapter folded into the weights.",
    "adapter": "The trained adapter itself, with a reference to its base model: prefix and prompt "
    "tuning add virtual tokens, which are not weights, so they cannot be merged into the base.",
    "bnb-8bit": "bitsandbytes LLM.int8() weights, saved with `save_pretrained`; `quantization_config` in config.json "
    "makes a plain `from_pretrained` load them quantized (needs the `bitsandbytes` package).",
    "bnb-4bit": "bitsandbytes 4-bit NF4 with double quantization, saved with `save_pretrained`; `quantization_config` in "
    "config.json makes a plain `from_pretrained` load them quantized (needs the `bitsandbytes` package).",
    "gguf-f16": "GGUF, 2-D weights in F16, norms in F32; for llama.cpp, Ollama, LM Studio, or transformers (`gguf_file=`).",
    "gguf-q8_0": "GGUF, 2-D weights in Q8_0 (8-bit blocks of 32), norms in F32.",
    "gguf-q4_0": "GGUF, 2-D weights in Q4_0 (4-bit blocks of 32); token embedding and output head kept in Q8_0; norms in F32.",
}


def model_card(source: ExportSource, fmt: str, record: dict) -> str:
    recipe = source.recipe or {}
    base = (recipe.get("model") or {}).get("name") or source.base_path or source.name
    tags = ["llmtune", fmt] + (["gguf"] if fmt.startswith("gguf") else []) + (["bitsandbytes"] if fmt.startswith("bnb") else [])
    lines = [
        "---",
        f"base_model: {json.dumps(str(base))}",
        "library_name: " + ("peft" if record["kind"] == "adapter" else "transformers"),
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {source.name} ({fmt})",
        "",
        FORMAT_NOTES[record["kind"] if record["kind"] == "adapter" else fmt],
        "",
    ]

    lines += ["## Origin", "", "| | |", "|---|---|", f"| base model | `{base}` |"]
    if source.is_adapter:
        lines.append(
            f"| adapter | {source.adapter_kind}"
            + (" (merged into an fp32 reload of the base)" if source.mergeable else " (not mergeable)")
            + " |"
        )
    if recipe:
        adapter = recipe.get("adapter", {})
        lines.append(f"| method | {recipe.get('method', {}).get('kind', 'sft')} with adapter kind {adapter.get('kind')} |")
        train = source.summary.get("train", {})
        if train:
            loss = (
                f", loss {train['first_loss']:.4f} -> {train['final_loss']:.4f}"
                if train.get("first_loss") is not None and train.get("final_loss") is not None
                else ""
            )
            lines.append(
                f"| training | {train.get('steps')} steps{loss}, {train.get('trainable_params') or 0:,} trainable parameters |"
            )
        if source.manifest.get("started_at"):
            lines.append(f"| trained | {source.manifest['started_at']} (llmtune {source.manifest.get('llmtune')}) |")
    if source.run_dir:
        lines.append(f"| run directory | `{source.run_dir}` |")
    lines.append("")

    fingerprints = source.manifest.get("data_fingerprints") or {}
    if fingerprints:
        lines += [
            "## Data",
            "",
            "| source | fingerprint |",
            "|---|---|",
            *[f"| `{k}` | `{v}` |" for k, v in fingerprints.items()],
            "",
        ]
        stats = source.summary.get("data") or {}
        if stats:
            lines += [
                f"{stats.get('train_rows')} training rows ({stats.get('train_tokens')} tokens), "
                f"{stats.get('eval_rows')} held out.",
                "",
            ]

    evaluation = source.summary.get("eval") or {}
    if evaluation.get("after"):
        lines += ["## Evaluation (of the trained model, before export)", "", "| metric | before | after |", "|---|---|---|"]
        for metric, value in evaluation["after"].items():
            if metric != "n":
                lines.append(f"| {metric} | {evaluation.get('before', {}).get(metric, '')} | {value} |")
        lines += ["", f"n = {evaluation['after'].get('n')} held-out rows.", ""]

    lines += ["## Quantization and its measured cost", "", report_table(record), ""]
    lines += ["## Loading", "", "```python", *loading_snippet(fmt, record), "```", ""]
    if recipe:
        import yaml

        lines += [
            "## Recipe",
            "",
            "The resolved recipe of the run (every default spelled out):",
            "",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def report_table(record: dict) -> str:
    cost = record.get("cost") or {}
    rows = [
        ("format", record["format"]),
        ("files", ", ".join(f"`{k}` ({_mb(v)})" for k, v in record["files"].items() if not k.endswith(".md"))),
        ("total size", _mb(record["bytes"])),
        ("reference", record.get("reference", "")),
        ("held-out text", record.get("heldout", "")),
    ]
    if cost:
        rows += [
            (
                "perplexity (reference -> export)",
                f"{cost['perplexity_reference']:.4f} -> {cost['perplexity']:.4f} ({cost['perplexity_change']:+.2%})",
            ),
            ("top-1 next-token agreement", f"{cost['top1_agreement']:.2%} of {cost['tokens']} positions"),
            (
                "max / mean abs logit difference (first 8 texts)",
                f"{cost['max_abs_logit_diff']:.3g} / {cost['mean_abs_logit_diff']:.3g}",
            ),
        ]
    for name, check in (record.get("checks") or {}).items():
        rows.append((f"check: {name}", _check_text(check)))
    rows.append(
        (
            "verdict",
            "all checks passed"
            if record["ok"]
            else "FAILED: " + ", ".join(n for n, c in record["checks"].items() if not c.get("ok")),
        )
    )
    return "\n".join(["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])


def report(source: ExportSource, record: dict) -> str:
    return "\n".join(
        [
            f"# Export verification: {source.name} -> {record['format']}",
            "",
            report_table(record),
            "",
            "Perplexity and agreement are measured on the same token ids for the reference (the full-precision "
            "model the export came from) and the exported artifact reloaded from disk with plain transformers.",
            "",
        ]
    )


def loading_snippet(fmt: str, record: dict) -> list[str]:
    if record["kind"] == "adapter":
        return [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")  # loads the base it names',
            'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        ]
    if fmt.startswith("gguf"):
        return [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("<this directory>", gguf_file="{record["gguf_file"]}")',
            f'tokenizer = AutoTokenizer.from_pretrained("<this directory>", gguf_file="{record["gguf_file"]}")',
            f"# or: llama-cli -m <this directory>/{record['gguf_file']}",
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
    ]


def _check_text(check: dict) -> str:
    detail = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items() if k != "ok")
    return ("ok" if check.get("ok") else "FAILED") + (f" ({detail})" if detail else "")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
