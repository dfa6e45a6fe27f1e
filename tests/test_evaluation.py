"""Evaluation: lm_eval suites on the model in memory, native metrics, gates, reports, `llmtune eval`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl

from llmtune.cli import main
from llmtune.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

MC_ROWS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green light", "red"], "label": 0},
    {"question": "How many legs has a dog?", "choices": ["two", "four", "a hundred"], "label": 1},
    {"question": "Which is a fox?", "choices": ["the quick brown fox", "a lazy dog"], "label": 0},
    {"question": "Greet Ada.", "choices": ["Hello Ada!", "Goodbye", "You are 3."], "label": 0},
    {"question": "Who jumps?", "choices": ["dog", "fox", "nobody at all"], "label": 1},
]


@pytest.fixture
def mc_task_dir(tmp_path) -> Path:
    """An offline multiple-choice task in lm_eval's YAML format, with its data, written here."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_jsonl(folder / "toy_mc.jsonl", MC_ROWS)
    (folder / "toy_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "toy_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(folder / "toy_mc.jsonl")}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
                "metadata": {"version": 1.0},
            }
        )
    )
    return folder


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenized the way lm_eval documents it: the pair is encoded
    whole and split where the context's own encoding ends."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def test_multiple_choice_figures_equal_a_hand_computation(tiny_model, mc_task_dir):
    from llmtune.evaluation.harness import evaluate_suites
    from llmtune.evaluation.suites import suite_from_tasks

    model, tokenizer = tiny_model
    results = evaluate_suites(model, tokenizer, [(suite_from_tasks(["toy_mc"]), mc_task_dir)], include_paths=[mc_task_dir])

    acc, acc_norm = [], []
    for row in MC_ROWS:
        lls = [_hand_loglikelihood(model, tokenizer, f"Question: {row['question']}\nAnswer:", " " + c) for c in row["choices"]]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == row["label"]))
        normed = [ll / len(c) for ll, c in zip(lls, row["choices"])]  # acc_norm: per character of the choice
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == row["label"]))
    metrics = results["toy_mc"]["metrics"]
    n = len(MC_ROWS)
    assert results["toy_mc"]["n"] == n
    assert metrics["acc"]["value"] == pytest.approx(sum(acc) / n)
    assert metrics["acc_norm"]["value"] == pytest.approx(sum(acc_norm) / n)
    mean = sum(acc) / n  # lm_eval's stderr of a mean: sample standard deviation / sqrt(n)
    assert metrics["acc"]["stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1) / n))
    assert not model.training


def test_llmtune_eval_equals_lm_eval_own_entry_point(tiny_model_dir, mc_task_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir},dtype=float32",
        device="cpu",
        tasks=["toy_mc"],
        task_manager=TaskManager(include_path=str(mc_task_dir)),
        batch_size=8,
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--tasks",
                "toy_mc",
                "--include-path",
                str(mc_task_dir),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ours = json.loads((out / "summary.json").read_text())["eval"]["tasks"]["after"]["toy_mc"]["metrics"]
    for metric in ("acc", "acc_norm"):
        assert ours[metric]["value"] == reference["results"]["toy_mc"][f"{metric},none"]
        assert ours[metric]["stderr"] == pytest.approx(reference["results"]["toy_mc"][f"{metric}_stderr,none"])
    assert "| toy_mc | acc |" in (out / "results.md").read_text()
    assert (out / "samples-toy_mc.jsonl").is_file() and (out / "lm_eval.json").is_file()


def test_suite_data_files_point_a_task_at_local_jsonl(tiny_model, mc_task_dir, tmp_path):
    """A suite entry's data_files replaces the task's data source and keeps its prompt and metrics."""
    from llmtune.evaluation.harness import evaluate_suites
    from llmtune.evaluation.suites import load_suite

    write_jsonl(tmp_path / "other.jsonl", MC_ROWS[:2])
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        yaml.safe_dump({"name": "mine", "tasks": [{"task": "toy_mc", "metrics": ["acc"], "data_files": {"test": "other.jsonl"}}]})
    )
    model, tokenizer = tiny_model
    results = evaluate_suites(model, tokenizer, [load_suite(str(suite_file))], include_paths=[mc_task_dir])
    assert results["toy_mc"]["n"] == 2
    assert list(results["toy_mc"]["metrics"]) == ["acc"]  # only the metrics the suite names


def test_unknown_task_suggests_the_close_name(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_eazy"]) == 2
    assert "did you mean arc_easy" in capsys.readouterr().err


def test_hub_task_without_network_says_so_and_how_to_go_local(tiny_model_dir, tmp_path):
    env = os.environ | {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf"),
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtune.cli",
            "eval",
            "--model",
            str(tiny_model_dir),
            "--tasks",
            "arc_easy",
            "--limit",
            "2",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "task arc_easy: its data set comes from the Hugging Face hub, which cannot be reached" in out.stderr
    assert "data_files" in out.stderr


def test_shipped_suites_name_known_tasks_and_existing_files():
    from lm_eval.tasks import TaskManager

    from llmtune.evaluation.harness import _task_spec
    from llmtune.evaluation.suites import TASKS_DIR, list_suites, load_suite

    manager = TaskManager(include_path=str(TASKS_DIR))
    names = {p.stem for p in list_suites()}
    assert {"core", "quickstart"} <= names
    for path in list_suites():
        suite, base = load_suite(str(path))
        for task in suite.tasks:
            assert task.task in manager.all_tasks, f"{path.name}: unknown task {task.task}"
    quickstart = _task_spec(manager, load_suite("quickstart")[0].tasks[0], ROOT)
    data = quickstart["dataset_kwargs"]["data_files"]["test"]
    assert Path(data).is_absolute() and Path(data).is_file()  # resolved from the task file's folder, not the cwd


def test_shipped_multiple_choice_data_is_what_its_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_quickstart_mc", ROOT / "eval" / "tasks" / "make_quickstart_mc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [json.loads(line) for line in module.build().splitlines()]
    assert module.TARGET.read_text() == module.build()
    for row in rows:  # one right answer among four distinct choices
        assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4


def test_evaluation_leaves_the_callers_random_state_alone(tiny_model, mc_task_dir):
    from llmtune.evaluation.harness import evaluate_suites
    from llmtune.evaluation.suites import suite_from_tasks

    model, tokenizer = tiny_model
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_suites(model, tokenizer, [(suite_from_tasks(["toy_mc"]), mc_task_dir)], include_paths=[mc_task_dir])
    assert torch.equal(torch.rand(3), expected)


# -- native metrics ---------------------------------------------------------------------------------


def test_perplexity_pools_answer_tokens_and_ignores_padding(tiny_model):
    from conftest import greeting_rows

    from llmtune.evaluation.native import perplexity, tokenize_held_out

    model, tokenizer = tiny_model
    examples = tokenize_held_out([r["messages"] for r in greeting_rows(5)], tokenizer, "model")
    nll, tokens = 0.0, 0
    for ids, labels in examples:  # one row at a time, no padding: the model's own loss (mean over label tokens)
        n = sum(1 for t in labels[1:] if t != -100)
        with torch.no_grad():
            nll += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
        tokens += n
    batched = perplexity(model, examples, batch_size=3)
    assert batched["tokens"] == tokens
    assert batched["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_pairwise_accuracy_counts_chosen_scored_above_rejected(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    from llmtune.evaluation.native import pairwise_accuracy

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    pairs = [("Hello Ada! You are 1.", "Goodbye."), ("The quick brown fox", "jumps"), ("Greet Chen", "Hello Chen! You are 2.")]

    def score(text):
        with torch.no_grad():
            return model(**tiny_tokenizer(text, return_tensors="pt")).logits[0, 0].item()

    expected = sum(score(c) > score(r) for c, r in pairs) / len(pairs)
    result = pairwise_accuracy(model, tiny_tokenizer, pairs, batch_size=2)  # padded batches score like single rows
    assert result["pairwise_accuracy"] == pytest.approx(expected)
    assert result["n"] == 3


# -- gates and reports ------------------------------------------------------------------------------


def test_gates_min_max_and_regression():
    from llmtune.evaluation.gates import check_gates
    from llmtune.recipe.schema import GateSection

    before = {
        "arc": {"metrics": {"acc": {"value": 0.50, "higher_is_better": True}}},
        "heldout": {"metrics": {"perplexity": {"value": 3.0, "higher_is_better": False}}},
    }
    after = {
        "arc": {"metrics": {"acc": {"value": 0.47, "higher_is_better": True}}},
        "heldout": {"metrics": {"perplexity": {"value": 3.5, "higher_is_better": False}}},
    }
    gates = [
        GateSection(task="arc", metric="acc", min=0.45),
        GateSection(task="arc", metric="acc", max_regression=0.02),
        GateSection(task="heldout", metric="perplexity", max_regression=1.0),
        GateSection(task="heldout", metric="perplexity", max=3.2),
        GateSection(task="mmlu", metric="acc", min=0.3),
    ]
    verdict = check_gates(gates, after, before)
    assert not verdict["passed"]
    assert verdict["checked"] == [
        "arc/acc = 0.47, minimum 0.45",
        "heldout/perplexity = 3.5 against base 3: regression 0.5, allowed 1",
    ]
    assert [f.split(" ")[0] for f in verdict["failures"]] == ["arc/acc", "heldout/perplexity", "mmlu/acc:"]
    assert "regression 0.03" in verdict["failures"][0]
    assert check_gates(gates[:1], after)["passed"]


def test_gate_needs_a_condition_a_measured_figure_and_regression_needs_before_after(make_recipe):
    from llmtune.recipe import load_recipe

    with pytest.raises(UserError, match="a gate needs min, max or max_regression"):
        load_recipe(make_recipe(eval={"gates": [{"task": "heldout", "metric": "exact_match"}]}), [])
    with pytest.raises(UserError, match="max_regression compares with the base model; set eval.before_after: true"):
        load_recipe(
            make_recipe(eval={"perplexity": True, "gates": [{"task": "heldout", "metric": "perplexity", "max_regression": 0.1}]}),
            [],
        )
    with pytest.raises(
        UserError, match=r"eval.gates\[0\]: heldout/perplexity is not measured by this recipe; add eval.perplexity: true"
    ):
        load_recipe(make_recipe(eval={"gates": [{"task": "heldout", "metric": "perplexity", "max": 9.0}]}), [])


def test_compare_prints_differences(tmp_path, capsys):
    for name, value in (("a", 0.40), ("b", 0.55)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(
            json.dumps(
                {
                    "model": name,
                    "eval": {
                        "tasks": {
                            "after": {
                                "arc": {
                                    "n": 100,
                                    "metrics": {
                                        "acc": {"value": value, "stderr": 0.05},
                                        "acc_norm": {"value": 0.5, "stderr": 0.05},
                                    },
                                }
                            }
                        }
                    },
                }
            )
        )
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "+0.1500" in out and "+0.0000" in out
    from llmtune.evaluation.reports import compare

    rows = {r["metric"]: r for r in compare(str(tmp_path / "a"), str(tmp_path / "b"))}
    assert rows["acc"]["diff"] == pytest.approx(0.15) and rows["acc"]["significant"]  # 0.15 > 2 * sqrt(2) * 0.05
    assert not rows["acc_norm"]["significant"]
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2


# -- the recipe's eval section, end to end on the tiny model ----------------------------------------


def test_recipe_eval_section_reports_before_after_and_a_failed_gate_exits_3(make_recipe, mc_task_dir, tmp_path, capsys):
    path = make_recipe(
        eval={
            "before_after": True,
            "tasks": ["toy_mc"],
            "include_paths": [str(mc_task_dir)],
            "perplexity": True,
            "every_n_steps": 3,
            "sample_prompts": ["Greet Ada number 1."],
            "gates": [{"task": "heldout", "metric": "perplexity", "max": 1.0}, {"task": "toy_mc", "metric": "acc", "min": 0.0}],
        }
    )
    assert main(["train", str(path)]) == 3
    assert "gate failed" in capsys.readouterr().err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["gates"]["failures"][0].startswith("heldout/perplexity = ")
    assert summary["gates"]["checked"] == [
        "toy_mc/acc = " + f"{summary['eval']['tasks']['after']['toy_mc']['metrics']['acc']['value']:.4g}, minimum 0"
    ]
    tasks = summary["eval"]["tasks"]
    for when in ("before", "after"):
        assert set(tasks[when]) == {"toy_mc", "heldout"}
        assert (run / "eval" / f"samples-{when}.jsonl").is_file()
        assert (run / "eval" / f"samples-toy_mc-{when}.jsonl").is_file()
    ppl = tasks["after"]["heldout"]["metrics"]["perplexity"]["value"]
    assert tasks["delta"]["heldout"]["perplexity"] == pytest.approx(
        ppl - tasks["before"]["heldout"]["metrics"]["perplexity"]["value"], abs=1e-5
    )
    assert ppl < tasks["before"]["heldout"]["metrics"]["perplexity"]["value"]  # 6 steps at lr 5e-3 on the same kind of rows
    periodic = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_perplexity" in r]
    assert [r["step"] for r in periodic] == [3, 6]
    assert periodic[-1]["eval_perplexity"] == pytest.approx(ppl, rel=1e-3)  # the same model and rows as the final figure
    assert "| toy_mc | acc |" in (run / "eval" / "results.md").read_text()
    assert (run / "plots" / "eval_tasks.png").is_file()


def test_evaluating_before_training_does_not_change_training(make_recipe, mc_task_dir, tmp_path):
    from llmtune.pipeline import run_recipe
    from llmtune.recipe import load_recipe

    plain = run_recipe(*load_recipe(make_recipe(), [f"train.output_dir={tmp_path / 'plain'}"]))
    with_eval = run_recipe(
        *load_recipe(
            make_recipe(eval={"before_after": True, "tasks": ["toy_mc"], "include_paths": [str(mc_task_dir)]}),
            [f"train.output_dir={tmp_path / 'evaluated'}"],
        )
    )
    assert with_eval.summary["train"]["final_loss"] == plain.summary["train"]["final_loss"]
