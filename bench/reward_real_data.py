"""A reward model on real preference pairs: Anthropic hh-rlhf (harmless-base test split), held-out
pairwise accuracy against chance (50%). Manual check only: reads /work/shared/data when present.

    python bench/reward_real_data.py [--train 1500] [--test 700] [--steps 120] [--max-length 192] [--out DIR]

The pairs are full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts; llmtune's `preference` format
splits them at the last assistant turn. Held-out pairs are disjoint from the training pairs (the
split's first rows train, the last rows test). The model is the embedded SmolLM2-135M-Instruct
with LoRA (q/k/v/o) and a new score head; pairs longer than --max-length tokens are dropped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

DATA = Path("/work/shared/data/preference/harmless-base_test.jsonl.gz")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--test", type=int, default=700)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not DATA.is_file():
        sys.exit(f"skipped: {DATA} is not on this machine")
    rows = [json.loads(line) for line in gzip.open(DATA, "rt")]
    work = Path(tempfile.mkdtemp(prefix="reward-hh-"))
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: args.train]))
    (work / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[-args.test :]))
    recipe_text = f"""
model: {{name: smollm2-135m-instruct}}
data:
  sources: [{{path: {work}/train.jsonl, format: preference}}]
  eval_sources: [{{path: {work}/test.jsonl, format: preference}}]
  max_length: {args.max_length}
method: {{kind: reward}}
adapter: {{kind: lora, r: 16, alpha: 32, target_modules: attention}}
train:
  output_dir: {args.out or work / "run"}
  max_steps: {args.steps}
  batch_size: 8
  learning_rate: 5.0e-4
  warmup: 0.1
  save_steps: 1000
"""
    (work / "recipe.yaml").write_text(recipe_text)
    from llmtune.pipeline import run_recipe
    from llmtune.recipe import load_recipe

    result = run_recipe(*load_recipe(work / "recipe.yaml"))
    after = result.summary["eval"]["after"]
    print(
        json.dumps(
            {
                "pairs_train": result.summary["data"]["train_rows"],
                "pairs_held_out": after["n"],
                "held_out_accuracy": after["accuracy"],
                "held_out_margin": after["margin"],
                "steps": args.steps,
                "runtime_s": result.summary["train"]["runtime_s"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
