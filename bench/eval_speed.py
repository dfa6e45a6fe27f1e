"""`llmtune eval` against lm_eval's own command line: same model, task, rows and batch size; wall-time ratio.

    python bench/eval_speed.py [--limit 100] [--rounds 2] [--task arc_easy_local]

Both sides are the commands a user types, timed end to end (process start, imports, model load,
data, scoring, writing results), on the embedded SmolLM2-135M-Instruct (its cached safetensors
folder) in fp32 on the CPU, batch size 8:

    llmtune eval --model DIR --tasks TASK --include-path TASKS --limit N --batch-size 8 --output ...
    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --device cpu --tasks TASK \
        --include_path TASKS --limit N --batch_size 8 --output_path ...

The task is ARC-Easy in lm_eval's own prompt format, read from /work/shared/data/eval/ (a local
copy of the validation split; the bench says so and stops when it is absent), or `--task
quickstart_orders` (generation, offline, in eval/tasks). Runs alternate so drift hits both sides.
The script also checks both report the same figures. Target: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARC = Path("/work/shared/data/eval/arc_easy_validation.jsonl")
ARC_TASK = """task: arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
test_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", default="arc_easy_local", choices=["arc_easy_local", "quickstart_orders"])
    args = parser.parse_args()

    from llmtune.models.builtin import resolve_builtin

    model_dir = resolve_builtin("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    tasks_dir = ROOT / "eval" / "tasks"
    if args.task == "arc_easy_local":
        if not ARC.is_file():
            sys.exit(f"{ARC} is absent: this bench reads a local ARC-Easy copy; run it with --task quickstart_orders instead")
        tasks_dir = work / "tasks"
        tasks_dir.mkdir()
        (tasks_dir / "arc_easy_local.yaml").write_text(ARC_TASK.format(path=ARC))
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    bin_dir = Path(sys.executable).parent
    common = ["--limit", str(args.limit)]
    times: dict[str, list[float]] = {"lm_eval": [], "llmtune": []}
    for r in range(args.rounds):
        lm_out, our_out = work / f"lm_eval-{r}", work / f"llmtune-{r}"
        times["lm_eval"].append(
            timed(
                [
                    str(bin_dir / "lm_eval"),
                    "--model",
                    "hf",
                    "--model_args",
                    f"pretrained={model_dir},dtype=float32",
                    "--device",
                    "cpu",
                    "--tasks",
                    args.task,
                    "--include_path",
                    str(tasks_dir),
                    "--batch_size",
                    "8",
                    "--output_path",
                    str(lm_out),
                    *common,
                ],
                env,
            )
        )
        times["llmtune"].append(
            timed(
                [
                    sys.executable,
                    "-m",
                    "llmtune.cli",
                    "eval",
                    "--model",
                    str(model_dir),
                    "--tasks",
                    args.task,
                    "--include-path",
                    str(tasks_dir),
                    "--batch-size",
                    "8",
                    "--output",
                    str(our_out),
                    *common,
                ],
                env,
            )
        )
        print(f"round {r + 1}: lm_eval {times['lm_eval'][-1]:.1f} s, llmtune {times['llmtune'][-1]:.1f} s", flush=True)

    theirs = json.loads(next(lm_out.rglob("results_*.json")).read_text())["results"][args.task]
    ours = json.loads((our_out / "summary.json").read_text())["eval"]["tasks"]["after"][args.task]["metrics"]
    same = all(ours[m]["value"] == theirs[f"{m},none"] for m in ours if f"{m},none" in theirs)
    mean = {k: statistics.mean(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "task": args.task,
                "limit": args.limit,
                "rounds": args.rounds,
                "wall_s": times,
                "mean_s": {k: round(v, 1) for k, v in mean.items()},
                "ratio_llmtune_over_lm_eval": round(mean["llmtune"] / mean["lm_eval"], 3),
                "figures": {m: v["value"] for m, v in ours.items()},
                "same_figures_as_lm_eval": same,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
