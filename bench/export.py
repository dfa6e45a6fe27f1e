"""Export a run to every format and print what each cost: size, perplexity change, top-1 agreement, time.

    python bench/export.py RUN_DIR [--formats merged,bnb-8bit,...] [--out DIR]

RUN_DIR is a finished run, e.g. the quickstart's:
    llmtune train recipes/quickstart.yaml train.output_dir=/tmp/qs-export
Baseline: what a user does by hand for the merged format, PEFT's merge_and_unload + save_pretrained
(no verification), timed in the same run; the ratio is llmtune's merged export (merge, write, reload,
measure, model card) over that.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from llmtune.export.formats import FORMATS, export_model


def plain_merge_seconds(run_dir: Path, out: Path) -> float:
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = AutoPeftModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(run_dir / "final").save_pretrained(out)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--out", type=Path, help="export root (default: RUN_DIR/export)")
    args = parser.parse_args()

    rows, reference = [], {}
    for fmt in args.formats.split(","):
        out = (args.out / fmt) if args.out else None
        record = export_model(args.run_dir, fmt, out, reference_cache=reference)
        rows.append(record)
    baseline = None
    if (args.run_dir / "final" / "adapter_config.json").is_file():
        tmp = Path(tempfile.mkdtemp())
        try:
            baseline = plain_merge_seconds(args.run_dir, tmp / "merged")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print("\n| format | size | perplexity (fp32 -> export) | change | top-1 agreement | max abs logit diff | checks | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cost"]
        print(
            f"| `{r['format']}` | {r['bytes'] / 1e6:.1f} MB | {c['perplexity_reference']:.4f} -> {c['perplexity']:.4f} | "
            f"{c['perplexity_change']:+.2%} | {c['top1_agreement']:.2%} | {c['max_abs_logit_diff']:.3g} | "
            f"{'ok' if r['ok'] else 'FAILED'} | {r['seconds']} |"
        )
    print(f"\nheld-out text: {rows[0]['heldout']}; {rows[0]['cost']['tokens']} predicted tokens")
    merged = next((r for r in rows if r["format"] == "merged"), None)
    if baseline and merged:
        print(
            f"merged export {merged['seconds']} s vs plain merge_and_unload + save_pretrained {baseline:.1f} s: "
            f"ratio {merged['seconds'] / baseline:.2f}x (the difference is the reload and measurement)"
        )
    print(json.dumps({r["format"]: {k: r[k] for k in ("bytes", "ok", "seconds")} | r["cost"] for r in rows}))


if __name__ == "__main__":
    main()
