"""Launch: run in this process, or re-execute `llmtune train` under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmtune.errors import UserError
from llmtune.recipe import Recipe
from llmtune.runs import RunDir

LAUNCHED_ENV = "LLMTUNE_LAUNCHED"


def relaunch_if_needed(recipe: Recipe, args) -> bool:
    """Re-exec under `accelerate launch` when the recipe asks for it; True if that happened."""
    cfg = recipe.launch
    if cfg.accelerate_config is None or os.environ.get(LAUNCHED_ENV):
        return False
    config = Path(cfg.accelerate_config)
    if not config.is_file():
        raise UserError(f"launch.accelerate_config: {config} not found")
    overrides = list(args.overrides)
    if recipe.train.output_dir is None:
        # Every rank must write to the same run directory, so the parent picks it once.
        overrides.append(f"train.output_dir={RunDir.for_recipe(recipe, args.resume).path}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if cfg.num_processes:
        command += ["--num_processes", str(cfg.num_processes)]
    command += ["-m", "llmtune.cli", "train", args.recipe, *overrides] + (["--resume"] if args.resume else [])
    result = subprocess.run(command, env=os.environ | {LAUNCHED_ENV: "1"})
    if result.returncode:
        sys.exit(result.returncode)
    return True
