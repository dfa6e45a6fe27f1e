"""The run directory: what a run leaves behind for people and machines, and how it resumes.

    recipe.resolved.yaml  manifest.json  metrics.jsonl  summary.json  plots/  checkpoints/  final/

`RunDir` is the one writer of these files: trainers, callbacks and export go through its methods
(`append_metrics`, `commit_checkpoint`, `write_summary`, `record_export`), which write on rank 0
only and atomically (a temp file or directory, then a rename), so a killed run never leaves half a
file behind. Checkpoints: the trainer writes into `checkpoints/.staging/`, and only a finished
checkpoint is renamed into `checkpoints/checkpoint-<step>`, so anything under that name is complete;
`commit_checkpoint` also rotates out all but the newest `train.save_total_limit`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from llmtune import __version__
from llmtune.distributed import is_main_process, world_size
from llmtune.errors import UserError
from llmtune.recipe import Recipe, dump_recipe

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "datasets", "bitsandbytes")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """A run directory and the only code that writes its metrics, summary and checkpoints."""

    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.staging = self.checkpoints / ".staging"
        self.final = path / "final"
        self.metrics = path / "metrics.jsonl"
        self.summary = path / "summary.json"
        self.plots = path / "plots"

    # -- creation and resume -------------------------------------------------------------------

    @classmethod
    def for_recipe(cls, recipe: Recipe, resume: bool) -> RunDir:
        """The run directory to write: new, or the one being resumed."""
        if recipe.train.output_dir:
            path = Path(recipe.train.output_dir)
        elif resume:
            # Exactly this recipe's runs: `qlora` must not resume a newer `qlora-8bit-...` run.
            pattern = re.compile(rf"^{re.escape(recipe.name)}-\d{{8}}-\d{{6}}$")
            candidates = sorted(p for p in Path("runs").glob(f"{recipe.name}-*") if pattern.match(p.name))
            if not candidates:
                raise UserError(f"--resume: no earlier run of {recipe.name} under runs/; start it without --resume")
            path = candidates[-1]
        else:
            path = default_run_dir(recipe.name)
        run = cls(path)
        if resume and not (path / "recipe.resolved.yaml").is_file():
            raise UserError(f"--resume: {path} is not an llmtune run directory (no recipe.resolved.yaml)")
        # Only rank 0 checks: the other ranks start while rank 0 may already be writing here.
        if not resume and is_main_process() and path.exists() and any(path.iterdir()):
            raise UserError(
                f"train.output_dir: {path} already holds a run; pass --resume to continue it, or choose another directory"
            )
        return run

    def start(self, recipe: Recipe, resume: bool) -> None:
        if not is_main_process():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        resolved = dump_recipe(recipe)
        stored = self.path / "recipe.resolved.yaml"
        if resume and stored.read_text() != resolved:
            print(
                "[llmtune] warning: the recipe differs from the one this run started with; "
                f"continuing with the new one (old copy: {stored}.previous)"
            )
            shutil.copy(stored, f"{stored}.previous")
        write_atomic(stored, resolved)
        shutil.rmtree(self.staging, ignore_errors=True)  # a checkpoint that was being written when the run died

    def latest_checkpoint(self) -> Path | None:
        steps = [(int(m.group(1)), p) for p in self.checkpoints.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
        return max(steps)[1] if steps else None

    def write_manifest(
        self, recipe: Recipe, model_path: str, fingerprints: dict[str, str], started_at: str, **extra: Any
    ) -> None:
        if not is_main_process():
            return
        previous = self.read_json("manifest.json")
        if previous:  # a resumed run: keep when it first started, and say if the data changed since
            extra["resumed_at"] = started_at
            started_at = previous["started_at"]
            if previous["data_fingerprints"] != fingerprints:
                print("[llmtune] warning: the training data changed since this run started; resuming with the new data")
        manifest = {
            "llmtune": __version__,
            "python": platform.python_version(),
            "packages": {name: _version(name) for name in TRACKED_PACKAGES},
            "git_commit": _git_commit(),
            "hardware": hardware(),
            "command": sys.argv,
            "seed": recipe.train.seed,
            "model": {"name": recipe.model.name, "path": model_path},
            "data_fingerprints": fingerprints,
            "started_at": started_at,
            **extra,
        }
        write_atomic(self.path / "manifest.json", json.dumps(manifest, indent=2))

    def update_manifest(self, **fields: Any) -> None:
        if not is_main_process():
            return
        manifest = json.loads((self.path / "manifest.json").read_text())
        write_atomic(self.path / "manifest.json", json.dumps(manifest | fields, indent=2))

    # -- metrics and summary -------------------------------------------------------------------

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after the checkpoint we resume from: those steps run again."""
        if not self.metrics.is_file() or not is_main_process():
            return
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        """One logged step (or held-out measurement) as a line of metrics.jsonl."""
        if not is_main_process():
            return
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        if is_main_process():
            write_atomic(self.summary, json.dumps(summary, indent=2))

    def record_export(self, fmt: str, record: dict) -> None:
        """An export's record under `export.<format>` of summary.json (export runs after the summary exists)."""
        summary = self.read_json("summary.json") or {}
        summary.setdefault("export", {})[fmt] = record
        self.write_summary(summary)

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def write_json(self, name: str, data: dict) -> None:
        if is_main_process():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / name, json.dumps(data, indent=2))

    def plot_loss(self) -> Path | None:
        rows = [r for r in self.read_metrics() if "loss" in r]
        if not rows or not is_main_process():
            return None
        plt = _pyplot()
        self.plots.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.5)
        ax.set(xlabel="optimizer step", ylabel="training loss", title=f"{self.path.name}: training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.plots / "loss.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out

    def plot_eval(self, evaluation: dict) -> Path | None:
        """Bars of each held-out metric before and after training."""
        if "after" not in evaluation or not is_main_process():
            return None
        plt = _pyplot()
        metrics = [m for m in evaluation["after"] if m != "n"]
        stages = [s for s in ("before", "after") if s in evaluation]
        self.plots.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 4))
        width = 0.8 / len(stages)
        for i, stage in enumerate(stages):
            xs = [j + i * width for j in range(len(metrics))]
            bars = ax.bar(xs, [evaluation[stage][m] for m in metrics], width, label=stage)
            ax.bar_label(bars, fmt="%.2f")
        ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(metrics))], metrics)
        ax.set(ylim=(0, 1.1), title=f"held-out evaluation (n={evaluation['after']['n']})")
        ax.legend()
        fig.tight_layout()
        out = self.plots / "eval.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        return out

    # -- checkpoints and final model ---------------------------------------------------------------

    def callback(self, save_total_limit: int) -> RunCallback:
        """The TrainerCallback every Trainer-based method passes: metrics, checkpoints, progress bar."""
        return RunCallback(self, save_total_limit)

    def commit_checkpoint(self, name: str, save_total_limit: int) -> None:
        """Rename a finished checkpoint from staging into place, then keep only the newest ones."""
        if not is_main_process():
            return
        staged = self.staging / name
        if staged.is_dir():
            os.replace(staged, self.checkpoints / name)
        steps = sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
        for step in steps[:-save_total_limit]:
            shutil.rmtree(self.checkpoints / f"checkpoint-{step}", ignore_errors=True)

    def save_final(self, trainer, tokenizer) -> Path:
        """final/: the adapter or full model plus tokenizer, written to a temp dir then renamed.

        Every rank calls this: trainer.save_model gathers ZeRO-3 / FSDP shards, and writes on rank 0 only.
        """
        tmp = self.path / ".final.tmp"
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        if is_main_process():
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(self.final, ignore_errors=True)
            os.replace(tmp, self.final)
        return self.final


class RunCallback(TrainerCallback):
    """A Trainer's link to its RunDir: logged rows to metrics.jsonl, finished checkpoints into place, one progress bar."""

    def __init__(self, run: RunDir, save_total_limit: int):
        self.run = run
        self.save_total_limit = save_total_limit
        self.bar = None
        self._last = None  # (time, tokens seen, step) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        t, seen, step = time.perf_counter(), state.num_input_tokens_seen, state.global_step
        row = {"step": step, "loss": logs["loss"], "lr": logs.get("learning_rate")}
        if self._last and t > self._last[0] and step > self._last[2]:
            row["tokens_per_s"] = round((seen - self._last[1]) / (t - self._last[0]), 1)
            row["step_time_s"] = round((t - self._last[0]) / (step - self._last[2]), 3)
        self._last = (t, seen, step)
        import torch

        if torch.cuda.is_available():  # rank 0's peak so far, to set beside `llmtune plan`'s estimate
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        row |= {k: v for k, v in logs.items() if k not in ("loss", "learning_rate")}
        self.run.append_metrics(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (RNG state, shards) before the rename
        self.run.commit_checkpoint(f"checkpoint-{state.global_step}", self.save_total_limit)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
        if state.is_world_process_zero:
            shutil.rmtree(self.run.staging, ignore_errors=True)  # only ever holds unfinished work


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "world_size": world_size(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
