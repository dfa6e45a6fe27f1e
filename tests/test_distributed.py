"""Several processes on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2 through Accelerate's launcher.

The invariant: N steps with 2 processes at per-device batch b give the same losses (and weights) as
1 process at batch 2b, because both see the same rows per step and average over the same tokens.
Slow (two interpreters start per run): `pytest -m slow tests/test_distributed.py`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def one_process(path, *overrides, resume=False):
    recipe, recipe_dir = load_recipe(path, list(overrides))
    return run_recipe(recipe, recipe_dir, resume=resume).run


def llmtune_train(*args, cwd=ROOT, returncode=0):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "train", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == returncode, out.stdout[-3000:] + out.stderr[-6000:]
    return out


def launch_on_two_cpu_ranks(cwd: Path, *args, env: dict | None = None, pythonpath: tuple = (), timeout: int = 900):
    """`accelerate launch` of `args` on 2 CPU processes, as a user would: multi_gpu config with use_cpu
    (accelerate's --cpu flag would start one process only)."""
    config = cwd / "ddp_cpu.yaml"
    config.write_text((ROOT / "accelerate_configs" / "multi_gpu.yaml").read_text().replace("use_cpu: false", "use_cpu: true"))
    env = os.environ | (env or {}) | {"PYTHONPATH": os.pathsep.join([str(ROOT), *pythonpath, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--num_processes",
            "2",
            *map(str, args),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-6000:]
    return out


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol), key


def test_ddp_under_the_users_own_accelerate_launch_equals_one_process(make_recipe, tmp_path):
    """`accelerate launch -m llmtune.cli train` (no llmtune launch flags, no output_dir): ranks agree on one run dir."""
    path = make_recipe(train={"output_dir": None, "batch_size": 2, "max_steps": 4, "save_steps": 2})
    work = tmp_path / "work"
    work.mkdir()
    launch_on_two_cpu_ranks(work, "-m", "llmtune.cli", "train", path)
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks wrote into the directory rank 0 named
    two = runs[0]
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["hardware"]["world_size"] == 2

    one = one_process(path, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}").path
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    assert len(losses(two)) == 4
    assert_same_tensors(
        load_file(two / "final" / "adapter_model.safetensors"), load_file(one / "final" / "adapter_model.safetensors"), atol=1e-5
    )
    # Rank 0 alone wrote the run directory: one metrics row per step, complete checkpoints only.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (two / "checkpoints" / "checkpoint-2").iterdir()}


AGREE = """
import os, sys, time
from llmtune.launch import agree_on_run_dir
from llmtune.recipe import load_recipe
recipe, _ = load_recipe(sys.argv[1], [])
time.sleep(1.5 * int(os.environ["RANK"]))  # the ranks' clocks now read different seconds
# One write per line: the two ranks share one pipe, and print's separate pieces can interleave.
sys.stdout.write(f"agreed {os.environ['RANK']} {agree_on_run_dir(recipe, resume=False)}\\n")
sys.stdout.flush()
from llmtune.cli import _end_launched_rank
_end_launched_rank()  # as `llmtune train` ends a rank: no C++ teardown that could abort it
"""


def test_ranks_agree_on_the_run_directory_even_when_they_start_seconds_apart(make_recipe, tmp_path):
    path = make_recipe(train={"output_dir": None})
    (tmp_path / "agree.py").write_text(AGREE)
    out = launch_on_two_cpu_ranks(tmp_path, tmp_path / "agree.py", path, timeout=300)
    chosen = dict(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("agreed"))
    assert set(chosen) == {"0", "1"} and chosen["0"] == chosen["1"], chosen


def test_zero2_full_finetune_equals_one_process_and_final_is_a_plain_model(make_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_recipe(adapter={"kind": "full"}, train={"batch_size": 2, "max_steps": 3, "save_steps": 3, "learning_rate": 1e-3})
    two = tmp_path / "zero2"
    llmtune_train(path, f"train.output_dir={two}", "--accelerate-config", "deepspeed_zero2", "--num-processes", "2")
    one = one_process(path, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}").path
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    assert (two / "checkpoints" / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own sharded states
    # final/ loads with plain transformers and holds the same weights as the one-process run.
    trained = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    assert_same_tensors(trained, reference, atol=1e-4)


def test_zero3_lora_equals_one_process_resumes_from_its_deepspeed_checkpoint_and_exports(make_recipe, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_recipe(train={"batch_size": 2, "max_steps": 4, "save_steps": 2}, eval={"exact_match": {"max_new_tokens": 8}})
    two = tmp_path / "zero3"
    llmtune_train(path, f"train.output_dir={two}", "--accelerate-config", "deepspeed_zero3", "--num-processes", "2")
    one = one_process(path, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}").path
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    # The adapter was gathered from the ZeRO-3 shards: full shapes, same values, loads with plain PEFT.
    adapter = load_file(two / "final" / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in adapter.values())
    assert_same_tensors(adapter, load_file(one / "final" / "adapter_model.safetensors"), atol=1e-5)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), two / "final")
    # Rank 0 evaluated the gathered model (a ZeRO-3 shard alone cannot generate): same answers as one process.
    generations = lambda run: (run / "eval" / "generations-after.jsonl").read_text()
    assert json.loads((two / "summary.json").read_text())["eval"]["after"]["n"] == 6
    assert generations(two) == generations(one)

    # Kill after step 2: keep checkpoint-2 (DeepSpeed's sharded states), lose the rest; resume under ZeRO-3.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    for name in ("final", "summary.json", "checkpoints/checkpoint-4"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    llmtune_train(
        path, f"train.output_dir={resumed}", "--accelerate-config", "deepspeed_zero3", "--num-processes", "2", "--resume"
    )
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["train"]["resumed_from"].endswith("checkpoint-2")
    assert losses(resumed) == pytest.approx(losses(two), abs=1e-5)
    assert_same_tensors(load_file(resumed / "final" / "adapter_model.safetensors"), adapter, atol=1e-6)

    # Export takes the ZeRO-3 run directory like any other: its final/ holds gathered weights.
    from llmtune.cli import main

    assert main(["export", str(two), "--format", "merged"]) == 0
    record = json.loads((two / "summary.json").read_text())["export"]["merged"]
    assert record["ok"] and record["checks"]["merged_equals_trained"]["max_abs_logit_diff"] < 1e-4


def test_fsdp2_full_finetune_equals_one_process(make_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_recipe(
        adapter={"kind": "full"},
        train={"batch_size": 2, "max_steps": 3, "save_steps": 3, "learning_rate": 1e-3},
        eval={"exact_match": {"max_new_tokens": 8}},
    )
    two = tmp_path / "fsdp2"
    llmtune_train(path, f"train.output_dir={two}", "--accelerate-config", "fsdp2", "--num-processes", "2")
    one = one_process(path, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}").path
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    # FULL_STATE_DICT: final/ is one plain model gathered from the shards.
    assert_same_tensors(
        AutoModelForCausalLM.from_pretrained(two / "final").state_dict(),
        AutoModelForCausalLM.from_pretrained(one / "final").state_dict(),
        atol=1e-4,
    )
    assert (two / "eval" / "generations-after.jsonl").read_text() == (one / "eval" / "generations-after.jsonl").read_text()


def recorded_letters_a_to_m(prompts, completions, **kwargs):
    """test_ppo's reward, recording each call's prompts in $PPO_RECORD/rank-<RANK>.jsonl."""
    from test_ppo import letters_a_to_m

    with open(Path(os.environ["PPO_RECORD"]) / f"rank-{os.environ.get('RANK', '0')}.jsonl", "a") as f:
        f.write(json.dumps([p[-1]["content"] for p in prompts]) + "\n")
    return letters_a_to_m(prompts, completions)


def test_ppo_on_two_ranks_shares_out_the_prompts_gathers_the_metrics_and_resumes_exactly(tmp_path, tiny_model_dir):
    from test_ppo import ppo_recipe

    ppo_recipe(
        tmp_path,
        tiny_model_dir,
        {"kind": "lora", "r": 8, "alpha": 16},
        steps=3,
        lr=3e-2,
        reward_function="test_distributed:recorded_letters_a_to_m",
        kl_target=1.0,
    )
    record = tmp_path / "record"
    record.mkdir()
    launch_on_two_cpu_ranks(
        tmp_path,
        "-m",
        "llmtune.cli",
        "train",
        tmp_path / "ppo.yaml",
        "train.batch_size=8",
        "train.save_steps=2",
        env={"PPO_RECORD": str(record)},
        pythonpath=(str(ROOT / "tests"),),
    )

    # Calls in order on each rank: held-out before, 3 PPO steps, held-out after.
    calls = [[json.loads(line) for line in (record / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(calls[0]) == len(calls[1]) == 5
    for mine, theirs in zip(*calls):
        assert len(mine) == len(theirs) == 8 and not set(mine) & set(theirs)  # each rank its own share
    for k in (0, 4):
        assert all(int(p.split("number ")[1].rstrip(".")) >= 100 for p in calls[0][k] + calls[1][k])  # held-out ones
        assert len(set(calls[0][k] + calls[1][k])) == 16  # all 16 of them, between the two ranks

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["responses"] == 16 for r in rows)  # the global batch
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl_coef"] != rows[0]["kl_coef"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["before"]["n"] == summary["eval"]["after"]["n"] == 16
    state = torch.load(run / "checkpoints" / "checkpoint-2" / "ppo_state.pt", weights_only=False)
    assert len(state["torch_rng"]) == 2 and not torch.equal(*state["torch_rng"])  # each rank's own sampling state
    final = load_file(run / "final" / "adapter_model.safetensors")

    # Killed during step 3: checkpoint-2 is the newest complete one (metrics.jsonl keeps a stale row 3).
    # Resumed on two ranks, each rank samples from its own restored RNG: the same step 3, the same weights.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for name in ("final", "checkpoints/checkpoint-3"):
        shutil.rmtree(resumed / name, ignore_errors=True)  # the last step's checkpoint, where one was saved
    (resumed / "summary.json").unlink()
    (tmp_path / "record-resumed").mkdir()
    launch_on_two_cpu_ranks(
        tmp_path,
        "-m",
        "llmtune.cli",
        "train",
        tmp_path / "ppo.yaml",
        "train.batch_size=8",
        "train.save_steps=2",
        f"train.output_dir={resumed}",
        "--resume",
        env={"PPO_RECORD": str(tmp_path / "record-resumed")},
        pythonpath=(str(ROOT / "tests"),),
    )
    timing = ("tokens_per_s", "step_time_s")
    again = [
        {k: v for k, v in json.loads(line).items() if k not in timing}
        for line in (resumed / "metrics.jsonl").read_text().splitlines()
    ]
    assert again == [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert json.loads((resumed / "summary.json").read_text())["train"]["resumed_from"].endswith("checkpoint-2")
    assert_same_tensors(load_file(resumed / "final" / "adapter_model.safetensors"), final, atol=0)


def test_an_input_error_or_failed_gate_on_a_launched_rank_ends_the_launch_with_its_own_message_and_code(make_recipe, tmp_path):
    """torchrun reports any failed rank as exit 1; `llmtune train` still ends on the rank's message, exit 2 or 3."""
    launch = ["--accelerate-config", "multi_gpu", "--num-processes", "2"]
    gated = make_recipe(
        train={"batch_size": 2, "max_steps": 2, "save_steps": 2},
        eval={"perplexity": True, "gates": [{"task": "heldout", "metric": "perplexity", "max": 1.0}]},
    )
    out = llmtune_train(gated, f"train.output_dir={tmp_path / 'gated'}", *launch, returncode=3)
    assert out.stderr.strip().splitlines()[-2:][0] == "error: evaluation gate failed:", out.stderr[-3000:]
    assert "heldout/perplexity = " in out.stderr.strip().splitlines()[-1]

    (tmp_path / "garbage.jsonl").write_text('not json\n{"also": "no prompt"}\n')
    broken = make_recipe(data={"sources": [{"path": str(tmp_path / "garbage.jsonl")}]})
    out = llmtune_train(broken, f"train.output_dir={tmp_path / 'broken'}", *launch, returncode=2)
    tail = "\n".join(out.stderr.strip().splitlines()[-3:])  # the last thing printed, not torchrun's report
    assert tail.startswith("error: data.sources: no usable training rows") and "garbage.jsonl:1" in tail, out.stderr[-3000:]
