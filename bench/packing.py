"""Packing against padding: training tokens/s on variable-length real text, and the loss per token.

    python bench/packing.py [--steps 10] [--warmup 2] [--rounds 1]

Data: ../shared/data/instruction/alpaca_en_demo.json when present (instructions of very different
lengths), else variable-length rows this script writes. Both runs go through llmtune on the
embedded SmolLM2-135M-Instruct (fp32, LoRA r=16 on every linear layer), on the same rows in the
same order, with loss on the answers:

- padding (the plain-library default): batch 8, each batch padded to its longest row;
- packing: batch 4 rows of up to 1024 tokens, about as many tokens computed per step as the padded
  batch (TRL's best-fit-decreasing packer, position ids restarting per example). On CPU (sdpa
  attention) the rows stay apart (llmtune.data.collate): TRL's padding-free collator would make
  them one 4096-token sequence with a dense 4096 x 4096 attention, which measured 0.95x here.

Throughput = non-padding tokens / wall time of the steps after `--warmup`. "Loss per token" is the
token-averaged loss of the *initial* model over the same held-out rows, computed through each
setup's own batching (packed rows and padded batches): it must agree, or packing is not neutral.
The training losses of both runs are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "instruction" / "alpaca_en_demo.json"


def write_data(out: Path) -> tuple[Path, str]:
    if ALPACA.is_file():
        return ALPACA, "alpaca"
    print(f"{ALPACA} not found: writing variable-length rows instead")
    rng = random.Random(0)
    words = "the of and to a in that is was he for it with as his on be at by had".split()
    rows = [
        {
            "instruction": " ".join(rng.choices(words, k=rng.randint(3, 40))),
            "input": "",
            "output": " ".join(rng.choices(words, k=rng.choice([5, 20, 60, 200]))),
        }
        for _ in range(600)
    ]
    path = out / "variable.json"
    path.write_text(json.dumps(rows))
    return path, "alpaca"


def run(name: str, data: Path, fmt: str, packing: bool, steps: int, out: Path) -> dict:
    from llmtune.pipeline import run_recipe
    from llmtune.recipe import load_recipe

    recipe = {
        "name": f"bench-{name}",
        "data": {"sources": [{"path": str(data), "format": fmt}], "max_length": 1024, "packing": packing, "eval_fraction": 0.05},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32},
        "train": {
            "max_steps": steps,
            "batch_size": 4 if packing else 8,
            "learning_rate": 2e-4,
            "warmup": 0,
            "save_steps": 100000,
            "output_dir": str(out / name),
            "seed": 0,
        },
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_recipe(*load_recipe(path, []))
    return {"metrics": result.run.read_metrics(), "summary": result.summary}


def tokens_per_s(metrics: list[dict], warmup: int) -> float:
    start = next(r for r in metrics if r["step"] == warmup)["num_input_tokens_seen"]
    rows = [r for r in metrics if r["step"] > warmup]
    return (rows[-1]["num_input_tokens_seen"] - start) / sum(r["step_time_s"] for r in rows)


def heldout_loss_per_token(data: Path, fmt: str, packing: bool, out: Path) -> float:
    """Token-averaged loss of the untrained model on the held-out rows, batched as training batches them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from llmtune.data import pack, prepare_data
    from llmtune.data.collate import PackedRowsCollator
    from llmtune.models.builtin import resolve_builtin
    from llmtune.recipe.schema import DataSection

    path = resolve_builtin("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = DataSection(sources=[{"path": str(data), "format": fmt}], max_length=1024, eval_fraction=0.05)
    held_out = prepare_data(cfg, out, tokenizer, seed=0).eval
    rows = list(pack(held_out, 1024)[0] if packing else held_out)
    # What the trainer's collators do: packed rows kept apart on CPU; padded rows with an attention mask.
    collate = (PackedRowsCollator if packing else DataCollatorForLanguageModeling)(tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total, n, size = 0.0, 0, 4 if packing else 8
    with torch.no_grad():
        for i in range(0, len(rows), size):
            batch = collate(
                [{k: v for k, v in row.items() if k in ("input_ids", "labels", "seq_lengths")} for row in rows[i : i + size]]
            )
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
            labels = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            n += (labels != -100).sum().item()
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {"padding": [], "packing": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data, fmt = write_data(out)
        losses = {name: heldout_loss_per_token(data, fmt, name == "packing", out) for name in speeds}
        for i in range(args.rounds):
            for name in speeds:  # alternate, so drift of the machine hits both alike
                result = run(f"{name}{i}", data, fmt, name == "packing", args.steps, out)
                speeds[name].append(tokens_per_s(result["metrics"], args.warmup))
                train_loss = statistics.mean(r["loss"] for r in result["metrics"] if "loss" in r)
                print(
                    f"[bench] {name} round {i}: {speeds[name][-1]:.1f} tokens/s, mean training loss {train_loss:.4f}, "
                    f"data {result['summary']['data'].get('packing', 'not packed')}"
                )
    print(f"\nPacking vs padding, {data.name}, {args.steps} steps ({args.warmup} warm-up) x {args.rounds} round(s)")
    for name, values in speeds.items():
        print(f"  {name:8s} {statistics.mean(values):8.1f} tokens/s   held-out loss per token (initial model) {losses[name]:.6f}")
    print(
        f"  ratio packing / padding: {statistics.mean(speeds['packing']) / statistics.mean(speeds['padding']):.2f}x "
        f"(target >= 1.5); loss per token differs by {abs(losses['packing'] - losses['padding']):.2e}"
    )


if __name__ == "__main__":
    main()
