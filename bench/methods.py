"""Every adaptation method's recipe on the embedded model, the same number of steps each.

    python bench/methods.py [--steps 20] [--write-readme]

Per method: trainable parameters, peak memory (max RSS of its own process), seconds per optimizer
step (median after the first two), and the held-out score after training (quickstart exact match;
accuracy for the classification head). Each recipe runs in a fresh process so memory is its own.
--write-readme puts the table into README.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["lora", "dora", "qlora", "qlora-8bit", "full", "freeze", "prefix", "prompt", "ia3", "classification"]
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
# Runs llmtune's own CLI, then reports the process's peak resident memory (kB on Linux).
RUN_AND_MEASURE = (
    "import resource, sys; from llmtune.cli import main; rc = main(sys.argv[1:]); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def run_method(name: str, steps: int, out: Path) -> dict:
    command = [
        sys.executable,
        "-c",
        RUN_AND_MEASURE,
        "train",
        f"recipes/methods/{name}.yaml",
        f"train.max_steps={steps}",
        f"train.output_dir={out}",
        "eval.before_after=false",
        f"train.save_steps={steps}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(next(l for l in proc.stdout.splitlines() if l.startswith("MAXRSS_KB")).split()[1])
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    after = summary["eval"]["after"]
    score = f"{after['exact_match']:.0%} exact match" if "exact_match" in after else f"{after['accuracy']:.0%} accuracy"
    return {
        "method": name,
        "trainable": summary["train"]["trainable_params"],
        "total": summary["train"]["total_params"],
        "peak_mb": rss_kb / 1024,
        "s_per_step": statistics.median(r["step_time_s"] for r in rows if r["step"] > 2),
        "final_loss": summary["train"]["final_loss"],
        "score": score,
    }


def table(results: list[dict], steps: int) -> str:
    lines = [
        f"{steps} optimizer steps each, batch 8, on the embedded SmolLM2-135M-Instruct, fp32, "
        f"{date.today().isoformat()}, {platform.machine()} CPU with 2 cores (`python bench/methods.py --steps {steps}`):",
        "",
        "| method (recipe) | trainable params | peak memory | s/step | final loss | held-out after |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        share = r["trainable"] / r["total"]
        lines.append(
            f"| `recipes/methods/{r['method']}.yaml` | {r['trainable']:,} ({share:.2%}) | {r['peak_mb']:,.0f} MB "
            f"| {r['s_per_step']:.2f} | {r['final_loss']:.3f} | {r['score']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods.split(","):
            results.append(run_method(name, args.steps, Path(tmp) / name))
            print(json.dumps(results[-1]), flush=True)
    text = table(results, args.steps)
    print(text)
    if args.write_readme:
        readme = ROOT / "README.md"
        head, rest = readme.read_text().split(START)
        readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END)[1]}")


if __name__ == "__main__":
    main()
