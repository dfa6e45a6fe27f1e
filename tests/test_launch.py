"""Launch: shipped accelerate configs, the `accelerate launch` command llmtune builds, and the flags."""

import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from llmtune.errors import UserError
from llmtune.launch import (
    LaunchOptions,
    launch_command,
    launch_options,
    read_accelerate_config,
    resolve_accelerate_config,
    shipped_configs,
)
from llmtune.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "single_gpu",
    "multi_gpu",
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero2_offload",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
    "fsdp2",
    "multi_node",
}


def flags(**kw):
    return Namespace(
        **(
            {
                "accelerate_config": None,
                "num_processes": None,
                "num_machines": None,
                "machine_rank": None,
                "main_process_ip": None,
                "main_process_port": None,
            }
            | kw
        )
    )


def test_every_config_is_shipped_opens_with_when_to_use_it_and_accelerate_accepts_it():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = shipped_configs()
    assert EXPECTED <= set(configs)
    for name, path in configs.items():
        assert path.read_text().startswith("# "), f"{name} must open with a comment on when to use it"
        cluster = ClusterConfig.from_yaml_file(path)  # accelerate's own loader: rejects unknown keys
        assert cluster.mixed_precision == "no", f"{name}: precision comes from the recipe, not the config"
    zero3 = read_accelerate_config(configs["deepspeed_zero3"])
    assert zero3["deepspeed_config"]["zero3_save_16bit_model"] is True  # final/ must be a normal model
    assert read_accelerate_config(configs["deepspeed_zero2_offload"])["deepspeed_config"]["offload_optimizer_device"] == "cpu"
    assert read_accelerate_config(configs["fsdp2"])["fsdp_config"]["fsdp_version"] == 2


def test_slurm_example_is_valid_bash():
    script = ROOT / "accelerate_configs" / "slurm_multi_node.sh"
    assert script.read_text().startswith("#!/bin/bash\n# ")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--machine-rank \\$SLURM_NODEID" in script.read_text()  # expanded per node, not once


def test_config_resolves_by_name_or_path(tmp_path):
    assert resolve_accelerate_config("deepspeed_zero2") == shipped_configs()["deepspeed_zero2"]
    assert resolve_accelerate_config("deepspeed_zero2.yaml") == shipped_configs()["deepspeed_zero2"]
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert resolve_accelerate_config(str(own)) == own
    assert resolve_accelerate_config("mine.yaml", "launch.accelerate_config", base_dir=tmp_path) == tmp_path / "mine.yaml"
    with pytest.raises(UserError, match=r"--accelerate-config: deepspeed_zero4 .*shipped: .*deepspeed_zero3"):
        resolve_accelerate_config("deepspeed_zero4")


def test_cpu_launch_uses_a_use_cpu_copy_of_the_config_and_keeps_its_process_count(tmp_path):
    cmd = launch_command(LaunchOptions(config=shipped_configs()["deepspeed_zero3"]), ["r.yaml"], gpus=0, scratch=tmp_path)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert "--cpu" not in cmd  # accelerate's --cpu means its single-process launcher
    copy = read_accelerate_config(Path(cmd[cmd.index("--config_file") + 1]))
    assert copy == read_accelerate_config(shipped_configs()["deepspeed_zero3"]) | {"use_cpu": True}
    assert "--num_processes" not in cmd  # the config's own (2)
    assert cmd[-4:] == ["-m", "llmtune.cli", "train", "r.yaml"]


def test_gpu_launch_defaults_to_one_process_per_visible_gpu_on_every_machine(tmp_path):
    cmd = launch_command(LaunchOptions(config=shipped_configs()["multi_gpu"]), ["r.yaml"], gpus=8, scratch=tmp_path)
    assert cmd[cmd.index("--config_file") + 1] == str(shipped_configs()["multi_gpu"])
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    multi = LaunchOptions(config=shipped_configs()["multi_node"], num_machines=4, machine_rank=3, main_process_ip="10.1.2.3")
    cmd = launch_command(multi, ["r.yaml"], gpus=8, scratch=tmp_path)
    assert cmd[cmd.index("--num_processes") + 1] == "32"
    assert cmd[cmd.index("--machine_rank") + 1] == "3" and cmd[cmd.index("--main_process_ip") + 1] == "10.1.2.3"
    explicit = launch_command(
        LaunchOptions(config=shipped_configs()["multi_gpu"], num_processes=3), ["r.yaml"], gpus=8, scratch=tmp_path
    )
    assert explicit[explicit.index("--num_processes") + 1] == "3"
    single = launch_command(LaunchOptions(config=shipped_configs()["single_gpu"]), ["r.yaml"], gpus=8, scratch=tmp_path)
    assert "--num_processes" not in single


def test_launch_mistakes_are_user_errors(tmp_path):
    no_ip = tmp_path / "nodes.yaml"
    no_ip.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 4\n")
    with pytest.raises(UserError, match="--main-process-ip"):
        launch_command(LaunchOptions(config=no_ip), ["r.yaml"], gpus=2, scratch=tmp_path)
    with pytest.raises(UserError, match="--machine-rank: 2 is not below"):
        launch_command(
            LaunchOptions(config=shipped_configs()["multi_node"], machine_rank=2), ["r.yaml"], gpus=2, scratch=tmp_path
        )


def test_flags_win_over_the_recipe_and_need_a_config(make_recipe):
    recipe, recipe_dir = load_recipe(make_recipe(launch={"accelerate_config": "multi_gpu", "num_processes": 2}), [])
    options = launch_options(recipe, flags(), recipe_dir)
    assert options.config == shipped_configs()["multi_gpu"] and options.num_processes == 2
    options = launch_options(recipe, flags(accelerate_config="deepspeed_zero3", num_processes=4), recipe_dir)
    assert options.config == shipped_configs()["deepspeed_zero3"] and options.num_processes == 4
    plain, plain_dir = load_recipe(make_recipe(launch={}), [])
    assert launch_options(plain, flags(), plain_dir).config is None
    with pytest.raises(UserError, match="add --accelerate-config"):
        launch_options(plain, flags(num_processes=2), plain_dir)


def test_train_cli_reports_a_bad_config_name_with_exit_2(make_recipe):
    out = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "train", str(make_recipe()), "--accelerate-config", "nope"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--accelerate-config: nope is neither a file nor a shipped accelerate config" in out.stderr


def test_ppo_under_a_weight_sharding_engine_is_refused_before_launching(make_recipe, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n')
    path = make_recipe(
        data={"sources": [{"path": str(prompts), "format": "prompt_only"}], "eval_sources": []},
        method={"kind": "ppo", "ppo": {"reward_function": "m:f"}},
    )
    for config in ("deepspeed_zero2", "fsdp2"):
        out = subprocess.run(
            [sys.executable, "-m", "llmtune.cli", "train", str(path), "--accelerate-config", config],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert "method.kind ppo: runs on one process or DDP" in out.stderr and "launching" not in out.stdout


def test_per_rank_seeds_differ_and_rank_0_keeps_the_recipe_seed():
    import torch

    from llmtune.methods.trainers.hf import seed_this_rank

    draws = []
    for rank in (0, 1, 0):
        seed_this_rank(Namespace(seed=7, process_index=rank))
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    torch.manual_seed(7)
    assert torch.equal(draws[0], torch.rand(3))


def test_ls_lists_the_shipped_accelerate_configs(capsys):
    from llmtune.cli import main

    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "accelerate configs" in out and all(name in out for name in EXPECTED)
