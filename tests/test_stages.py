"""Multi-stage pipelines: sft -> reward -> ppo in one recipe on the tiny model."""

import json

import pytest
import yaml
from conftest import greeting_rows, preference_rows, write_jsonl
from test_ppo import prompt_rows

from llmtune.errors import UserError
from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe


def pipeline_recipe(tmp_path, tiny_model_dir, **extra):
    sft = write_jsonl(tmp_path / "sft.jsonl", greeting_rows(16))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(16))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", prompt_rows(4, offset=100))
    small = {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 1, "seed": 7}
    recipe = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"sources": [{"path": str(sft)}], "max_length": 64},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"output_dir": str(tmp_path / "run")} | small,
        "stages": [
            {"name": "sft"},
            {
                "name": "reward",
                "from_stage": "sft",
                "method": {"kind": "reward"},
                "data": {"sources": [{"path": str(pairs), "format": "preference"}], "max_length": 64},
            },
            {
                "name": "ppo",
                "from_stage": "sft",
                "reward_from_stage": "reward",
                "method": {"kind": "ppo", "ppo": {"max_new_tokens": 4, "mini_batch_size": 2, "ppo_epochs": 1}},
                "data": {
                    "sources": [{"path": str(prompts), "format": "prompt_only"}],
                    "eval_sources": [{"path": str(held_out), "format": "prompt_only"}],
                    "max_length": 64,
                },
            },
        ],
    } | extra
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow  # CI runs it; a few minutes on a busy 2-core CPU
def test_pipeline_runs_each_stage_in_its_own_directory_and_resume_skips_completed_ones(tmp_path, tiny_model_dir):
    path = pipeline_recipe(tmp_path, tiny_model_dir)
    result = run_recipe(*load_recipe(path))
    run = result.run.path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and list(summary["stages"]) == ["sft", "reward", "ppo"]
    for stage in ("sft", "reward", "ppo"):
        assert json.loads((run / stage / "summary.json").read_text())["status"] == "completed"
    # ppo trained the merged SFT model and scored with the reward stage's final/
    ppo = yaml.safe_load((run / "ppo" / "recipe.resolved.yaml").read_text())
    assert ppo["model"]["name"] == str(run / "sft" / "final-merged")
    assert ppo["method"]["ppo"]["reward_model"] == str(run / "reward" / "final")
    assert yaml.safe_load((run / "reward" / "recipe.resolved.yaml").read_text())["model"]["name"] == str(
        run / "sft" / "final-merged"
    )
    assert {"before", "after", "delta"} <= set(summary["eval"]["ppo"])  # plus the task layout ("tasks") for reports and gates
    assert summary["eval"]["ppo"]["before"]["n"] == 4

    # Resume after the reward stage: sft and reward are skipped, ppo runs again from scratch.
    import shutil

    shutil.rmtree(run / "ppo")
    (run / "summary.json").unlink()
    sft_mtime = (run / "sft" / "summary.json").stat().st_mtime
    resumed = run_recipe(*load_recipe(path), resume=True)
    assert (run / "sft" / "summary.json").stat().st_mtime == sft_mtime
    assert resumed.summary["stages"]["ppo"]["status"] == "completed"


def test_stage_mistakes_name_the_stage_and_key(tmp_path, tiny_model_dir):
    path = pipeline_recipe(
        tmp_path,
        tiny_model_dir,
        stages=[
            {"name": "a", "from_stage": "b"},
            {
                "name": "b",
                "reward_from_stage": "a",
                "method": {"kind": "ppo"},
                "data": {"sources": [{"path": "p.jsonl", "format": "prompt_only"}]},
            },
            {"name": "c", "method": {"kind": "ppo"}},
            {"name": "b"},
        ],
    )
    with pytest.raises(UserError) as info:
        load_recipe(path)
    problems = info.value.problems
    assert "stages[0].from_stage: 'b' is not an earlier stage (earlier: none)" in problems
    assert any(p.startswith("stages[1].reward_from_stage: stage 'a' trains sft") for p in problems)
    assert any(p.startswith("stages[2].data.sources[0].format: method.kind ppo reads") for p in problems)
    assert any(p.startswith("stages[3].name: 'b' is used by an earlier stage") for p in problems)

    path = pipeline_recipe(tmp_path, tiny_model_dir, stages=[{"name": "a", "train": {"max_stepz": 3}}])
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems == ["stages[0].train.max_stepz: unknown key; did you mean 'max_steps'?"]


def test_shipped_rlhf_data_equals_its_generator_and_held_out_prompts_are_unseen(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "recipes" / "rlhf"
    spec = importlib.util.spec_from_file_location("make_rlhf_data", root / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out=tmp_path)
    for name in ("sft", "preference", "prompts", "held_out_prompts"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (root / "data" / f"{name}.jsonl").read_text()
    training_text = "".join((tmp_path / f"{n}.jsonl").read_text() for n in ("sft", "preference", "prompts"))
    for name in module.HELD_OUT_NAMES + module.HELD_OUT_ITEMS:
        assert name not in training_text
    held_out = [json.loads(line)["prompt"] for line in (tmp_path / "held_out_prompts.jsonl").read_text().splitlines()]
    assert all(any(n in p for n in module.HELD_OUT_NAMES) for p in held_out)
