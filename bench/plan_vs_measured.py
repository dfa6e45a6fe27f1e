"""`llmtune plan`'s estimate beside measured memory, on the CPU, for the embedded SmolLM2-135M.

For each case a fresh process loads the model as llmtune does (fp32 on CPU), applies the adapter,
and runs optimizer steps on a batch of random tokens of the planned shape with a plain torch loop.
Measured:
  - peak RSS growth (peak resident memory minus the resident memory after imports): the whole
    training footprint, which `llmtune plan` estimates as its "estimated peak";
  - bytes autograd saves for backward (weights excluded, through saved_tensors_hooks), which the
    plan's "activations" and "logits and loss" rows estimate (logits also counted in the plan
    for their gradient, which autograd does not save).

    python bench/plan_vs_measured.py                 # lora and full, batch 8 x 128 tokens
    python bench/plan_vs_measured.py --seq-len 256 --cases lora
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(case: str, batch: int, seq_len: int, steps: int) -> dict:
    """Runs in its own process (RSS is per process)."""
    import torch

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from transformers import AutoModelForCausalLM

    from llmtune.models.adapter import apply_adapter
    from llmtune.models.load import resolve_model_path
    from llmtune.recipe.schema import AdapterSection

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m-instruct"), dtype=torch.float32)
    model = apply_adapter(model, AdapterSection(kind=case) if case != "lora" else AdapterSection(kind="lora", r=16))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(10, 40000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    for step in range(steps):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else _null()
        with hooks:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_growth": peak - rss0, "saved_for_backward": sum(saved.values())}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def estimate(case: str, batch: int, seq_len: int) -> dict:
    from llmtune.plan import estimate_memory
    from llmtune.recipe.schema import Recipe

    adapter = {"kind": case} if case != "lora" else {"kind": "lora", "r": 16}
    recipe = Recipe.model_validate(
        {
            "data": {"sources": [{"path": "unused.jsonl"}], "max_length": seq_len},
            "adapter": adapter,
            "train": {"batch_size": batch},
        }
    )
    plan = estimate_memory(recipe, None, device="cpu")
    return {
        "peak": plan.peak_bytes,
        "activations": plan.gpu["activations"],
        "logits": plan.gpu["logits and loss"],
        "trainable": plan.trainable_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="lora,full")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure, args.batch, args.seq_len, args.steps)))
        return
    print(f"SmolLM2-135M-Instruct, fp32, CPU, batch {args.batch} x {args.seq_len} tokens, {args.steps} AdamW steps\n")
    print(
        "| case | plan: peak | measured: peak RSS growth | ratio "
        "| plan: activations + logits | measured: saved for backward | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_measure",
                case,
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        est = estimate(case, args.batch, args.seq_len)
        # The plan's logits row also holds their gradient (a third of it); autograd saves the rest.
        saved_est = est["activations"] + est["logits"] * 2 / 3
        print(
            f"| {case} | {est['peak'] / 1e9:.2f} GB | {measured['rss_growth'] / 1e9:.2f} GB | "
            f"{est['peak'] / measured['rss_growth']:.2f} | {saved_est / 1e9:.2f} GB | "
            f"{measured['saved_for_backward'] / 1e9:.2f} GB | {saved_est / measured['saved_for_backward']:.2f} |"
        )


if __name__ == "__main__":
    main()
