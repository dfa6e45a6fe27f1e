"""Launch: run in this process, or re-execute `llmtune train` under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from llmtune.errors import UserError
from llmtune.recipe import Recipe

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
    if recipe.train.output_dir is None and args.resume is False:
        # Every rank must write to the same run directory, so the parent names it once.
        overrides.append(f"train.output_dir=runs/{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if cfg.num_processes:
        command += ["--num_processes", str(cfg.num_processes)]
    command += ["-m", "llmtune.cli", "train", args.recipe, *overrides]
    if args.resume is not False:
        command += ["--resume"] if args.resume is True else ["--resume", args.resume]
    result = subprocess.run(command, env=os.environ | {LAUNCHED_ENV: "1"})
    if result.returncode:
        sys.exit(result.returncode)
    return True
