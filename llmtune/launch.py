"""Launch: run in this process, or re-execute `llmtune train` under `accelerate launch`.

Multi-GPU and multi-node runs go through Accelerate's launcher (torchrun underneath) with one of the
configs in accelerate_configs/ (DDP, DeepSpeed ZeRO-1/2/3 with or without offload, FSDP2), or a
user's own. A run started under the user's own `accelerate launch` / `torchrun` is not launched again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmtune.distributed import is_main_process, world_size
from llmtune.errors import EXIT_DIR_ENV, GateFailed, UserError
from llmtune.recipe import Recipe
from llmtune.runs import RunDir

LAUNCHED_ENV = "LLMTUNE_LAUNCHED"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "accelerate_configs"


@dataclass(frozen=True)
class LaunchOptions:
    """What to launch with: the recipe's launch section, overridden by `llmtune train` flags."""

    config: Path | None = None
    num_processes: int | None = None
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None


def shipped_configs() -> dict[str, Path]:
    """Name -> file of the configs in accelerate_configs/ (`llmtune ls` lists them)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_accelerate_config(value: str, key: str = "--accelerate-config", base_dir: Path | None = None) -> Path:
    """A path to an accelerate config file, or the name of a shipped one (`deepspeed_zero2`)."""
    candidates = [Path(value).expanduser()]
    if base_dir is not None and not Path(value).is_absolute():
        candidates.append(base_dir / value)  # a recipe's path is relative to the recipe file, like data paths
    for path in candidates:
        if path.is_file():
            return path
    shipped = shipped_configs()
    if value.removesuffix(".yaml") in shipped:
        return shipped[value.removesuffix(".yaml")]
    raise UserError(
        f"{key}: {value} is neither a file nor a shipped accelerate config; shipped: {', '.join(shipped) or '(none found)'}"
    )


def read_accelerate_config(path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"accelerate config {path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"accelerate config {path}: expected a mapping of accelerate settings")
    return config


def launch_options(recipe: Recipe, args, recipe_dir: Path | None = None) -> LaunchOptions:
    """Merge `llmtune train` flags over the recipe's launch section (flags win)."""
    flag = getattr(args, "accelerate_config", None)
    config = (
        resolve_accelerate_config(flag)
        if flag
        else resolve_accelerate_config(recipe.launch.accelerate_config, "launch.accelerate_config", recipe_dir)
        if recipe.launch.accelerate_config
        else None
    )
    multi_node = [getattr(args, name, None) for name in ("num_machines", "machine_rank", "main_process_ip")]
    if config is None and (getattr(args, "num_processes", None) or any(v is not None for v in multi_node)):
        raise UserError(
            "--num-processes / --num-machines / --machine-rank / --main-process-ip configure an "
            "Accelerate launch; add --accelerate-config NAME (e.g. multi_gpu, multi_node)"
        )
    return LaunchOptions(
        config=config,
        num_processes=getattr(args, "num_processes", None) or recipe.launch.num_processes,
        num_machines=getattr(args, "num_machines", None),
        machine_rank=getattr(args, "machine_rank", None),
        main_process_ip=getattr(args, "main_process_ip", None),
        main_process_port=getattr(args, "main_process_port", None),
    )


# Engines that shard the weights between ranks: a method that needs whole weights on every rank
# (e.g. PPO's rollouts call generate() on the unwrapped policy) cannot run under them.
SHARDING_ENGINES = ("DEEPSPEED", "FSDP")


def whole_weights_error(kind: str) -> str:
    return (
        f"method.kind {kind}: runs on one process or DDP (accelerate_configs/multi_gpu.yaml, multi_node.yaml); "
        "DeepSpeed and FSDP shard the weights it samples from. Use multi_gpu, or LoRA/QLoRA to fit the "
        "model on each GPU"
    )


def inside_launcher() -> bool:
    """True in a process started by a launcher: ours, the user's own `accelerate launch`, or torchrun."""
    return bool(os.environ.get(LAUNCHED_ENV)) or "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def shards_weights() -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP: the engine places each rank's shard, so the whole model
    must not be moved onto one GPU first."""
    zero3 = (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )
    return zero3 or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def launch_command(options: LaunchOptions, train_args: list[str], gpus: int, scratch: Path) -> list[str]:
    """`accelerate launch` with the config and overrides, running `llmtune train` in each process.

    Without GPUs the config is copied into `scratch` with `use_cpu: true`: Accelerate's `--cpu` flag
    would fall back to its single-process launcher, while `use_cpu` in the config keeps torchrun
    (or DeepSpeed's launcher) and runs every process on the CPU over gloo.
    """
    config = read_accelerate_config(options.config)
    distributed = str(config.get("distributed_type", "NO")).upper()
    config_file = options.config  # DDP, DeepSpeed and FSDP2 all run on CPU processes (tests/test_distributed.py)
    if gpus == 0:
        import yaml

        config_file = scratch / f"{options.config.stem}.cpu.yaml"
        config_file.write_text(yaml.safe_dump(config | {"use_cpu": True}))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    num_machines = options.num_machines or int(config.get("num_machines", 1))
    num_processes = options.num_processes
    if num_processes is None and gpus and distributed != "NO":
        num_processes = gpus * num_machines  # one process per visible GPU on every machine, as torchrun users expect
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    if options.num_machines is not None:
        command += ["--num_machines", str(options.num_machines)]
    if options.machine_rank is not None:
        command += ["--machine_rank", str(options.machine_rank)]
    if options.main_process_ip is not None:
        command += ["--main_process_ip", options.main_process_ip]
    if options.main_process_port is not None:
        command += ["--main_process_port", str(options.main_process_port)]
    if num_machines > 1 and options.main_process_ip is None and not config.get("main_process_ip"):
        raise UserError("--main-process-ip: a multi-machine launch needs the rank-0 machine's address")
    if options.machine_rank is not None and options.machine_rank >= num_machines:
        raise UserError(f"--machine-rank: {options.machine_rank} is not below --num-machines {num_machines}")
    return command + ["-m", "llmtune.cli", "train", *train_args]


def relaunch_if_needed(recipe: Recipe, args, recipe_dir: Path | None = None) -> bool:
    """Re-exec under `accelerate launch` when the recipe or flags ask for it; True if that happened."""
    if inside_launcher():
        return False
    options = launch_options(recipe, args, recipe_dir)
    if options.config is None:
        return False
    import torch

    from llmtune.methods import METHODS
    from llmtune.models.load import resolve_model_path

    distributed = str(read_accelerate_config(options.config).get("distributed_type", "NO")).upper()
    kinds = {recipe.method.kind} | {stage.method.kind for stage in recipe.stages if stage.method}
    for kind in sorted(kinds):
        if METHODS[kind].WHOLE_WEIGHTS_PER_RANK and distributed in SHARDING_ENGINES:
            raise UserError(whole_weights_error(kind))
    resolve_model_path(recipe.model.name)  # converts a built-in model once here, not in every process
    gpus = torch.cuda.device_count()
    overrides = list(args.overrides)
    if recipe.train.output_dir is None:
        # Every rank must write to the same run directory, so the parent picks it once.
        overrides.append(f"train.output_dir={RunDir.for_recipe(recipe, args.resume).path}")
    train_args = [args.recipe, *overrides] + (["--resume"] if args.resume else []) + (["--debug"] if args.debug else [])
    with tempfile.TemporaryDirectory(prefix="llmtune-launch-") as scratch:
        command = launch_command(options, train_args, gpus, Path(scratch))
        print(f"[llmtune] launching: accelerate launch {' '.join(command[3:])}", flush=True)
        result = subprocess.run(command, env=os.environ | {LAUNCHED_ENV: "1", EXIT_DIR_ENV: scratch})
        if result.returncode:
            raise_what_a_rank_stopped_on(Path(scratch))  # the rank's own message and exit code, if it left one
            sys.exit(result.returncode)
    return True


def raise_what_a_rank_stopped_on(folder: Path) -> None:
    """Re-raise, in the launching process, the error the lowest rank recorded (if any rank did)."""
    records = sorted(folder.glob("rank*.json"))
    if not records:
        return
    record = json.loads(records[0].read_text())
    if "failures" in record:
        raise GateFailed(record["failures"])
    raise UserError(record["message"])


def agree_on_run_dir(recipe: Recipe, resume: bool) -> str | None:
    """Under the user's own multi-process launcher, rank 0 names the default run directory for all ranks.

    (Our own launch passes train.output_dir to every rank; a plain `accelerate launch -m llmtune.cli
    train` does not, and each rank's timestamp could differ by a second.) Returns the directory to
    use, or None when there is nothing to agree on.
    """
    if recipe.train.output_dir is not None or world_size() <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from llmtune.models.load import training_device

    # Joins the process group the trainer will use. On a CPU-only machine the state must be asked for
    # the CPU explicitly: PartialState() alone is a one-process state there, the broadcast below a
    # no-op, and ranks would only agree when their clocks read the same second.
    PartialState(cpu=training_device().type == "cpu")
    chosen = [str(RunDir.for_recipe(recipe, resume).path) if is_main_process() else None]
    broadcast_object_list(chosen, from_process=0)
    return chosen[0]
