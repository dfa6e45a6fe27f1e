"""`llmtune export`: one artifact per format, each verified against the model it came from.

    merged     fp32 safetensors + tokenizer + generation config (an adapter folded into its base)
    bnb-8bit   bitsandbytes LLM.int8(), reloadable by plain `from_pretrained`
    bnb-4bit   bitsandbytes NF4 + double quantization, reloadable by plain `from_pretrained`
    gguf-f16, gguf-q8_0, gguf-q4_0   one GGUF file (written by llmtune/export/gguf.py)

Every export directory gets README.md (the model card), report.md (the verification) and
summary.json (the same as data); a run's own summary.json records it under `export.<format>`.
The export is written to `<dir>.tmp` and renamed into place, then reloaded from disk for the checks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmtune.errors import UserError
from llmtune.export import card
from llmtune.export.gguf import GGUF_FORMATS, check_gguf_supported, expected_weight, gguf_tensor_name, write_gguf
from llmtune.export.merge import FP32, load_trained, merge
from llmtune.export.source import SAMPLE_TEXTS, ExportSource, heldout_texts, resolve_source
from llmtune.export.verify import compare, directory_bytes, make_batches, measure, tokenizer_round_trip

FORMATS = ("merged", "bnb-8bit", "bnb-4bit", *GGUF_FORMATS)
# Merged vs adapter logits in fp32: 1e-4, or 1e-5 of the largest logit for models with large logits.
# Merging changes the order of the float operations (x(W + BA) vs xW + (xB)A), and the rounding
# difference grows with depth and logit size: measured 1.3e-4 on SmolLM2-135M (30 layers, logits
# up to ~41) against ~3e-7 on the 2-layer test model.
MERGE_TOLERANCE = 1e-4
MERGE_RELATIVE_TOLERANCE = 1e-5
GGUF_FILE = "model.gguf"


def export_model(
    spec: str | Path,
    fmt: str,
    output: str | Path | None = None,
    heldout_rows: list | None = None,
    update_run_summary: bool = True,
    reference_cache: dict | None = None,
) -> dict:
    """Export `spec` (run directory, model directory or built-in name) as `fmt`; returns the verification record.

    `reference_cache`: pass the same dict to several calls for one source, and the fp32 reference is
    measured once instead of once per format.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    source = resolve_source(str(spec))
    if source.is_adapter and not source.mergeable and fmt != "merged":
        raise UserError(
            f"--format {fmt}: a {source.adapter_kind} adapter cannot be merged into its base (virtual tokens are "
            "not weights), so there is no standalone model to quantize; use --format merged, which exports "
            "the adapter with a reference to its base"
        )
    out_dir = Path(output) if output else default_output(source, fmt)
    _check_replaceable(out_dir)
    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(source)
    if fmt in GGUF_FORMATS:
        from transformers import AutoConfig

        check_gguf_supported(AutoConfig.from_pretrained(source.base_path or source.model_dir), _tokenizer_dir(source))

    # The reference every format is measured against: the model as trained, in fp32.
    trained = load_trained(source)
    cache = reference_cache if reference_cache is not None else {}
    if cache.get("source") != str(spec):
        texts, heldout = _texts(source, tokenizer, heldout_rows)
        batches = make_batches(tokenizer, texts)
        print(f"[llmtune] export {source.name}: measuring the fp32 reference on {heldout}")
        cache.update(source=str(spec), texts=texts, heldout=heldout, batches=batches, reference=measure(trained, batches))
    texts, heldout, batches, reference = cache["texts"], cache["heldout"], cache["batches"], cache["reference"]
    print(f"[llmtune] export {source.name} -> {fmt}")

    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    merged = None  # kept for the GGUF weight check
    record: dict = {
        "format": fmt,
        "path": str(out_dir),
        "source": str(spec),
        "heldout": heldout,
        "reference": "the trained model in fp32" + (" (base + adapter)" if source.is_adapter else ""),
    }
    try:
        if source.is_adapter and not source.mergeable:
            record |= _write_adapter(source, staging)
        elif fmt == "merged":
            merge(trained, source).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            record["kind"] = "merged"
        elif fmt.startswith("bnb"):
            record |= _write_bnb(source, merge(trained, source), tokenizer, staging, fmt)
        else:
            merged = merge(trained, source)
            print(f"[llmtune] writing {fmt} with the gguf package")
            record["tensor_types"] = write_gguf(
                merged.state_dict(), merged.config, _tokenizer_dir(source), staging / GGUF_FILE, fmt, source.name
            )
            record |= {"kind": "gguf", "gguf_file": GGUF_FILE}
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    # The checks run on what a user will load: the files on disk, read back with plain transformers/peft.
    checks, cost = _verify(fmt, record, out_dir, tokenizer, texts, batches, reference, merged)
    del merged
    record["cost"] = cost
    record["checks"] = checks
    record["ok"] = all(c["ok"] for c in checks.values())
    record["max_abs_logit_diff"] = cost["max_abs_logit_diff"]
    record["files"] = directory_bytes(out_dir)
    record["bytes"] = sum(record["files"].values())
    record["seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "report.md").write_text(card.report(source, record))
    (out_dir / "README.md").write_text(card.model_card(source, fmt, record))
    record["files"] = directory_bytes(out_dir)
    record["bytes"] = sum(record["files"].values())
    (out_dir / "summary.json").write_text(json.dumps(record, indent=2))
    if source.run_dir and update_run_summary:
        _record_in_run(source.run_dir, fmt, record)
    return record


def default_output(source: ExportSource, fmt: str) -> Path:
    if source.run_dir:
        return source.run_dir / "export" / fmt
    return Path("exports") / f"{source.name}-{fmt}"


# -- writers ---------------------------------------------------------------------------------------


def _write_adapter(source: ExportSource, out: Path) -> dict:
    """Prefix/prompt tuning: the adapter files, pointing at the base they need."""
    for f in source.model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(Path(source.base_path).resolve())
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    print(
        f"[llmtune] a {source.adapter_kind} adapter cannot be merged; exporting the adapter with a reference to "
        f"its base ({source.base_path})"
    )
    return {
        "kind": "adapter",
        "base_model": str(Path(source.base_path).resolve()),
        "note": f"{source.adapter_kind} cannot be merged into the base (virtual tokens are not weights); exported as an adapter",
    }


def _write_bnb(source: ExportSource, merged, tokenizer, out: Path, fmt: str) -> dict:
    """Quantize at load time (the only way transformers quantizes), from an fp32 copy of the merged weights."""
    from transformers import AutoModelForCausalLM

    from llmtune.models.load import bnb_config, training_device

    bits = fmt.removeprefix("bnb-")
    with tempfile.TemporaryDirectory(prefix=".llmtune-fp32-", dir=out.parent) as full:
        if source.is_adapter:
            merged.save_pretrained(full)
            path = full
        else:
            path = str(source.model_dir)
        print(f"[llmtune] quantizing with bitsandbytes ({bits})")
        quantized = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=bnb_config(bits, FP32), dtype=torch.float32, device_map={"": training_device()}
        )
        quantized.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"kind": "bitsandbytes", "quantization_config": quantized.config.quantization_config.to_dict()}


# -- verification ----------------------------------------------------------------------------------


@torch.no_grad()
def _verify(fmt, record, out_dir, tokenizer, texts, batches, reference, merged) -> tuple[dict, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checks: dict[str, dict] = {}
    if record["kind"] == "adapter":
        from peft import AutoPeftModelForCausalLM

        reloaded = AutoPeftModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        cost = compare(reference, measure(reloaded, batches), batches)
        checks["reload"] = {"ok": True, "loader": "peft AutoPeftModelForCausalLM"}
        checks["same_logits"] = {"ok": cost["max_abs_logit_diff"] < MERGE_TOLERANCE, "max_abs_diff": cost["max_abs_logit_diff"]}
        return checks, cost

    if record["kind"] == "gguf":
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
        checks["reload"] = {"ok": True, "loader": "transformers from_pretrained(gguf_file=)"}
        checks["weights"] = _gguf_weights_check(merged, reloaded, fmt)
        gguf_tokenizer = AutoTokenizer.from_pretrained(out_dir, gguf_file=GGUF_FILE)
        checks["tokenizer_round_trip"] = tokenizer_round_trip(
            tokenizer, gguf_tokenizer, list(dict.fromkeys(texts + SAMPLE_TEXTS))
        )
    else:
        # No extra arguments: a bitsandbytes export must say how it is quantized in its own config.json.
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
        quantized = getattr(reloaded.config, "quantization_config", None)
        if fmt.startswith("bnb"):
            bnb_layers = sum(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in reloaded.modules())
            checks["reload"] = {
                "ok": quantized is not None and bnb_layers > 0,
                "loader": "transformers from_pretrained",
                "quantized_layers": bnb_layers,
            }
        else:
            checks["reload"] = {"ok": quantized is None, "loader": "transformers from_pretrained"}
    cost = compare(reference, measure(reloaded, batches), batches)
    if fmt == "merged":
        tolerance = max(MERGE_TOLERANCE, MERGE_RELATIVE_TOLERANCE * cost["reference_max_abs_logit"])
        checks["merged_equals_trained"] = {
            "ok": cost["max_abs_logit_diff"] < tolerance,
            "max_abs_logit_diff": cost["max_abs_logit_diff"],
            "tolerance": tolerance,
        }
    checks["finite_logits"] = {"ok": math_finite(cost)}
    return checks, cost


def _gguf_weights_check(merged, reloaded, fmt: str) -> dict:
    """Every tensor read back equals the format's quantize -> dequantize round trip of the merged weight.

    This separates a wrong file (names, layouts, rotary permutation) from quantization error: the
    first shows up here, the second only in the cost figures.
    """
    got = reloaded.state_dict()
    worst, compared = 0.0, 0
    for name, tensor in merged.state_dict().items():
        gguf_name = gguf_tensor_name(name, merged.config)
        if gguf_name is None or name not in got or (merged.config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        want = torch.from_numpy(expected_weight(tensor.float().numpy(), gguf_name, fmt).astype("float32"))
        worst = max(worst, float((got[name].float() - want.reshape(got[name].shape)).abs().max()))
        compared += 1
    expected = sum(
        1
        for n in merged.state_dict()
        if gguf_tensor_name(n, merged.config) and not (merged.config.tie_word_embeddings and n == "lm_head.weight")
    )
    return {"ok": compared == expected and worst < 1e-5, "tensors": compared, "max_abs_diff": worst}


def math_finite(cost: dict) -> bool:
    import math

    return all(math.isfinite(cost[k]) for k in ("perplexity", "max_abs_logit_diff"))


# -- helpers ---------------------------------------------------------------------------------------


def _tokenizer_dir(source: ExportSource) -> Path:
    """Where the tokenizer files are: final/ of a run (saved beside the adapter), else the model or base."""
    for d in (source.model_dir, Path(source.base_path) if source.base_path else None):
        if d and ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
            return d
    raise UserError(f"export: no tokenizer files in {source.model_dir}" + (f" or {source.base_path}" if source.base_path else ""))


def _load_tokenizer(source: ExportSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out of every figure
    return tokenizer


def _texts(source: ExportSource, tokenizer, heldout_rows: list | None) -> tuple[list[str], str]:
    if heldout_rows:
        from llmtune.data.template import render_segments

        chat_template = (source.recipe or {}).get("data", {}).get("chat_template", "model")
        texts = ["".join(t for t, _ in render_segments(m, tokenizer, chat_template)) for m in heldout_rows[:32]]
        return texts, f"{len(texts)} held-out rows of the run's data"
    return heldout_texts(source, tokenizer)


def _check_replaceable(out_dir: Path) -> None:
    """An export replaces its directory: only ever an earlier export, never a folder of other files."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        previous = out_dir / "summary.json"
        if not (previous.is_file() and "format" in json.loads(previous.read_text() or "{}")):
            raise UserError(f"--output: {out_dir} exists and is not an earlier llmtune export; choose a new or empty directory")


def _record_in_run(run_dir: Path, fmt: str, record: dict) -> None:
    from llmtune.runs import RunDir

    RunDir(run_dir).record_export(fmt, record)
