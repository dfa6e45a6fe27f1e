"""llmtune's SFT throughput against a plain TRL SFTTrainer script, same model, data, batch and steps.

    python bench/sft_overhead.py [--steps 12] [--warmup 2] [--rounds 2]

Both sides: the embedded SmolLM2-135M-Instruct in fp32 without gradient checkpointing (the right
setting for a CPU), LoRA r=16 on q_proj/v_proj, batch 8, the quickstart data (loss on the answer
only), the same optimizer and learning rate. Throughput = non-padding tokens / wall time of the
optimizer steps after `--warmup` steps, measured the same way for both. Runs alternate (plain,
llmtune, plain, llmtune, ...) so that drift of the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def llmtune_tokens_per_s(steps: int, warmup: int, out: Path) -> float:
    from llmtune.pipeline import run_recipe
    from llmtune.recipe import load_recipe

    recipe, recipe_dir = load_recipe(
        RECIPE,
        [
            f"train.max_steps={steps}",
            f"train.output_dir={out}",
            "train.save_steps=100000",
            "eval.exact_match=null",
            "eval.before_after=false",
            "train.warmup=0",
        ],
    )
    run = run_recipe(recipe, recipe_dir).run
    rows = [r for r in run.read_metrics() if r["step"] > warmup]
    tokens = (
        rows[-1]["num_input_tokens_seen"] - next(r for r in run.read_metrics() if r["step"] == warmup)["num_input_tokens_seen"]
    )
    return tokens / sum(r["step_time_s"] for r in rows)


def plain_trl_tokens_per_s(steps: int, warmup: int, out: Path) -> float:
    """What a user would write with TRL directly, configured well for a CPU."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from llmtune.models.builtin import resolve_builtin

    path = resolve_builtin("smollm2-135m-instruct")
    rows = [json.loads(line)["messages"] for line in (RECIPE.parent / "data/quickstart/train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

    timer = StepTimer()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        processing_class=AutoTokenizer.from_pretrained(path),
        train_dataset=dataset,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        args=SFTConfig(
            output_dir=str(out),
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            gradient_checkpointing=False,
            use_cpu=True,
            bf16=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=42,
            include_num_input_tokens_seen="non_padding",
        ),
        callbacks=[timer],
    )
    trainer.train()
    (t0, n0), (t1, n1) = timer.marks[warmup], timer.marks[steps]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"plain TRL": [], "llmtune": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            results["plain TRL"].append(plain_trl_tokens_per_s(args.steps, args.warmup, Path(tmp) / f"plain{i}"))
            results["llmtune"].append(llmtune_tokens_per_s(args.steps, args.warmup, Path(tmp) / f"llmtune{i}"))
    print(f"\nSFT throughput, {args.steps} steps ({args.warmup} warm-up) x {args.rounds} rounds, {sys.platform}")
    for name, values in results.items():
        print(f"  {name:10s} {statistics.mean(values):8.1f} tokens/s   (rounds: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.mean(results["llmtune"]) / statistics.mean(results["plain TRL"])
    print(f"  ratio llmtune / plain TRL: {ratio:.2f}x  (target >= 0.95)")


if __name__ == "__main__":
    main()
