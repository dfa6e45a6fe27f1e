import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmtune.cli import main
from llmtune.errors import UserError
from llmtune.recipe import load_recipe
from llmtune.recipe.reference import render_reference

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BAD = """
model:
  nmae: foo
data:
  sources:
    - path: x.jsonl
      formt: messages
train:
  learning_rate: -1
  batch_size: many
adaptor: {}
"""


def test_every_mistake_is_reported_with_its_path(tmp_path):
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, BAD))
    problems = info.value.problems
    assert "model.nmae: unknown key; did you mean 'name'?" in problems
    assert "data.sources[0].formt: unknown key; did you mean 'format'?" in problems
    assert "adaptor: unknown key; did you mean 'adapter'?" in problems
    assert any(p.startswith("train.learning_rate: ") and "greater than 0" in p for p in problems)
    assert any(p.startswith("train.batch_size: ") and "integer" in p for p in problems)
    assert len(problems) == 5


def test_cli_validate_exit_code_2_and_no_traceback(tmp_path):
    path = write(tmp_path, BAD)
    out = subprocess.run([sys.executable, "-m", "llmtune.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    assert "train.learning_rate" in out.stderr and "did you mean 'format'" in out.stderr
    # Nothing but the message: no library noise after it (importing the training stack on the way out did that once).
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), out.stderr


def test_debug_flag_shows_traceback(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, BAD)), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, "data: {sources: [{path: a.jsonl}]}\n")
    recipe, _ = load_recipe(
        path,
        [
            "train.max_steps=10",
            "train.learning_rate=1e-4",
            "model.name=1e-4",
            "data.sources.0.max_samples=5",
            "adapter.target_modules=[q_proj,v_proj]",
        ],
    )
    assert recipe.train.max_steps == 10
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.model.name == "1e-4"  # a string field keeps the text as written
    assert recipe.data.sources[0].max_samples == 5
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]


def test_unknown_override_key_gets_a_suggestion(tmp_path):
    path = write(tmp_path, "data: {sources: [{path: a.jsonl}]}\n")
    with pytest.raises(UserError) as info:
        load_recipe(path, ["train.max_step=3", "noequals"])
    assert "noequals" in str(info.value)
    with pytest.raises(UserError) as info:
        load_recipe(path, ["train.max_step=3"])
    assert info.value.problems == ["train.max_step: unknown key; did you mean 'max_steps'?"]


def test_cross_field_checks_name_the_keys(tmp_path):
    path = write(tmp_path, "data: {sources: [{path: a.jsonl}]}\neval: {exact_match: {}}\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems[0].startswith("eval.exact_match: needs held-out rows")
    path = write(tmp_path, "data: {sources: [{path: a.jsonl, hub: b/c}]}\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems[0].startswith("data.sources[0]: give exactly one of")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))


def test_recipe_is_frozen(tmp_path):
    recipe, _ = load_recipe(write(tmp_path, "data: {sources: [{path: a.jsonl}]}\n"))
    with pytest.raises(ValidationError):  # pydantic refuses assignment to a frozen model
        recipe.train.max_steps = 3


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_says_how_to_run_it(path, capsys):
    from llmtune.cli import main

    assert main(["validate", str(path)]) == 0  # the verb a user runs, not only the loader beneath it
    assert capsys.readouterr().out.startswith(f"{path}: ok")
    first_lines = path.read_text().splitlines()[:3]
    assert any("llmtune train" in line for line in first_lines if line.startswith("#"))


def test_readme_recipe_reference_matches_the_schema():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"
    assert readme.split(start)[1].split(end)[0].strip() == render_reference().strip(), (
        "README recipe reference is stale: run python -m llmtune.recipe.reference --write README.md"
    )


def test_every_field_has_a_doc():
    from llmtune.recipe.load import _model_in
    from llmtune.recipe.schema import Recipe

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            sub = _model_in(field.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(Recipe, "")


@pytest.mark.parametrize("kind", ["lora", "full", "prefix", "prompt", "ia3"])
def test_resolved_recipe_validates_again(kind, tmp_path):
    from llmtune.recipe import dump_recipe

    path = write(tmp_path, f"data: {{sources: [{{path: a.jsonl}}]}}\nadapter: {{kind: {kind}}}\n")
    recipe, _ = load_recipe(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_recipe(recipe))
    assert load_recipe(again)[0] == recipe


def test_an_override_can_switch_the_adapter_kind(tmp_path):
    path = write(tmp_path, "data: {sources: [{path: a.jsonl}]}\nadapter: {kind: lora}\n")
    assert load_recipe(path, ["adapter.kind=ia3"])[0].adapter.kind == "ia3"
    with pytest.raises(UserError) as info:
        load_recipe(path, ["adapter.kind=ia3", "adapter.r=8"])
    assert info.value.problems == ["adapter.r: applies to kind lora only, not ia3; remove it"]


def test_union_fields_report_one_clean_path(tmp_path):
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, "data: {sources: [{path: a.jsonl}]}\nadapter: {target_modules: 5}\n"))
    assert [p.split(":")[0] for p in info.value.problems] == ["adapter.target_modules"]


def test_cross_field_problems_are_reported_together(tmp_path):
    text = (
        "data: {sources: [{path: a.jsonl}]}\neval: {exact_match: {}}\nlaunch: {num_processes: 2}\n"
        "adapter: {kind: prefix}\ntrain: {gradient_checkpointing: true, optimizer: adamw_torh}\n"
    )
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text))
    assert [p.split(":")[0] for p in info.value.problems] == ["train.optimizer"]
    assert "did you mean 'adamw_torch'" in info.value.problems[0]
    with pytest.raises(UserError) as info:
        load_recipe(write(tmp_path, text.replace("adamw_torh", "adamw_torch")))
    assert [p.split(":")[0] for p in info.value.problems] == ["eval.exact_match", "launch.num_processes", "adapter.kind"]


def test_bad_trainable_regex_is_a_recipe_error(tmp_path):
    with pytest.raises(UserError, match=r"adapter.trainable: '\(' is not a valid regular expression"):
        load_recipe(write(tmp_path, "data: {sources: [{path: a.jsonl}]}\nadapter: {kind: freeze, trainable: ['(']}\n"))


def test_resume_flag_does_not_swallow_overrides():
    from llmtune.cli import parse_args

    args = parse_args(["train", "r.yaml", "--resume", "train.max_steps=5"])
    assert args.resume is True and args.overrides == ["train.max_steps=5"]


def test_export_formats_are_checked_against_the_adapter_and_method(tmp_path):
    path = write(
        tmp_path, "data: {sources: [{path: a.jsonl}]}\nadapter: {kind: prefix}\nexport: {formats: [merged, gguf-q8_0]}\n"
    )
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems[0].startswith("export.formats: a prefix adapter cannot be merged")
    recipe, _ = load_recipe(path, ["export.formats=[merged]"])  # the adapter with a reference to its base
    assert recipe.export.formats == ["merged"]
    path = write(tmp_path, "data: {sources: [{path: a.jsonl}]}\nexport: {formats: [gguf-q5]}\n")
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert info.value.problems[0].startswith("export.formats[0]: Input should be")
