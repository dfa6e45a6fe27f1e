"""End-to-end runs in subprocesses, as a user runs them. Slow: `pytest -m slow` (CI runs them)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def llmtune(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "llmtune.cli", *map(str, args)], cwd=ROOT, **kwargs)


def test_quickstart_learns_the_task(tmp_path):
    out = tmp_path / "quickstart"
    proc = llmtune("train", "recipes/quickstart.yaml", f"train.output_dir={out}")
    assert proc.wait(timeout=900) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["before"]["exact_match"] < 0.2
    assert summary["eval"]["after"]["exact_match"] > 0.6
    assert (out / "final" / "adapter_model.safetensors").is_file()
    tasks = summary["eval"]["tasks"]  # the same figures in the task layout, with perplexity, for reports and gates
    assert tasks["after"]["heldout"]["metrics"]["exact_match"]["value"] == summary["eval"]["after"]["exact_match"]
    assert (
        tasks["after"]["heldout"]["metrics"]["perplexity"]["value"] < tasks["before"]["heldout"]["metrics"]["perplexity"]["value"]
    )
    assert summary["gates"]["passed"] and summary["status"] == "completed"
    assert "| heldout | exact_match |" in (out / "eval" / "results.md").read_text()
    assert (out / "plots" / "eval_tasks.png").is_file() and (out / "eval" / "samples-after.jsonl").is_file()

    # The trained adapter through lm-evaluation-harness's generation task on the same rows: greedy
    # decoding of the same prompts, so it agrees with llmtune's own exact match up to batch-padding noise.
    harness = tmp_path / "harness"
    proc = llmtune("eval", "--model", out, "--suite", "quickstart", "--output", harness)
    assert proc.wait(timeout=900) == 0
    lm = json.loads((harness / "summary.json").read_text())["eval"]["tasks"]["after"]["quickstart_orders"]
    assert lm["n"] == summary["eval"]["after"]["n"]
    assert abs(lm["metrics"]["exact_match"]["value"] - summary["eval"]["after"]["exact_match"]) <= 0.1


def test_sigkill_then_resume_matches_an_uninterrupted_run(make_recipe, tmp_path):
    path = make_recipe(train={"max_steps": 300, "save_steps": 25})
    killed_dir = tmp_path / "killed"
    proc = llmtune("train", path, f"train.output_dir={killed_dir}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed_dir / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "summary.json").exists(), "the run finished before it could be killed"

    resumed = llmtune("train", path, f"train.output_dir={killed_dir}", "--resume")
    assert resumed.wait(timeout=300) == 0
    recipe, recipe_dir = load_recipe(path, [f"train.output_dir={tmp_path / 'whole'}"])
    whole = run_recipe(recipe, recipe_dir).run

    resumed_summary = json.loads((killed_dir / "summary.json").read_text())
    whole_summary = json.loads((whole.path / "summary.json").read_text())
    assert resumed_summary["train"]["resumed_from"] is not None
    assert resumed_summary["train"]["steps"] == 300
    assert resumed_summary["train"]["final_loss"] == pytest.approx(whole_summary["train"]["final_loss"], abs=1e-4)
