"""Where this process stands in a launch: the one place that reads rank and world size.

torchrun and `accelerate launch` set RANK, LOCAL_RANK and WORLD_SIZE for every process; a plain
`llmtune train` is rank 0 of a world of 1.
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank among all processes of the launch (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Processes in the launch, all machines together."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 writes the run directory, evaluates and exports; other ranks only train."""
    return rank() == 0
