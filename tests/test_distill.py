"""Knowledge distillation (method.kind: distill) on the tiny models.

The teacher is a wider tiny Llama (hidden 128) that learnt *other* answers to the greeting prompts
("Hi Ada, number 3 here.") than the student's training rows hold ("Hello Ada! You are 3."). So the
student's held-out KL to the teacher falls through distillation, while plain cross-entropy on the
same rows barely moves it: the test tells the teacher's distributions from the data's answers.
"""

import json
import math

import pytest
import torch
from conftest import NAMES, write_jsonl

from llmtune.errors import UserError
from llmtune.methods.distill import divergence
from llmtune.pipeline import run_recipe
from llmtune.recipe import load_recipe


def other_answers(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Greet {NAMES[i % len(NAMES)]} number {i}."},
                {"role": "assistant", "content": f"Hi {NAMES[i % len(NAMES)]}, number {i} here."},
            ]
        }
        for i in range(n)
    ]


def tiny_llama(tokenizer, hidden: int, extra_vocab: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer) + extra_vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def teacher_dir(tiny_tokenizer_dir, tmp_path_factory):
    """40 full fine-tuning steps on the other answers (about 2 s)."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from llmtune.data.template import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_llama(tokenizer, hidden=128)
    rows = []
    for row in other_answers(64):
        input_ids, labels = tokenize_example(row["messages"], tokenizer, "model", "assistant")
        rows.append({"input_ids": input_ids, "labels": labels})
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = collate([rows[i] for i in torch.randperm(len(rows), generator=order)[:8]])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_divergence_by_hand():
    # One scored position, vocabulary of 2: teacher p = (1/2, 1/2), student q = (3/4, 1/4). Position 0 has no
    # label after it... the mask is on the *next* token: labels[:, 1] scores the logits at position 0.
    teacher = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    student = torch.tensor([[[math.log(3), 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[-100, 1]])
    forward = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p || q) = 0.143841
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q || p) = 0.130812
    m = (0.625, 0.375)  # beta 0.5: (p + q) / 2
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])
    )  # 0.033822
    for beta, expected in ((0.0, forward), (1.0, reverse), (0.5, jsd)):
        total, n = divergence(student, teacher, labels, beta)
        assert n == 1 and total.item() == pytest.approx(expected, abs=1e-6)
    # Temperature 2 halves both logits: q = softmax(log(3)/2, 0) = (sqrt3/(sqrt3+1), 1/(sqrt3+1)), p unchanged.
    q = (3**0.5 / (3**0.5 + 1), 1 / (3**0.5 + 1))
    total, _ = divergence(student, teacher, labels, 0.0, temperature=2.0)
    assert total.item() == pytest.approx(0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]), abs=1e-6)
    # The same as TRL's own kernel (the on-policy loss), for every beta.
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    eye = torch.eye(2)
    for beta in (0.0, 0.3, 0.5, 1.0):
        trl_value, _ = ChunkedDivergenceFunction.apply(student[0, :1], eye, None, teacher[0, :1], eye, None, beta)
        assert divergence(student, teacher, labels, beta)[0].item() == pytest.approx(trl_value.item(), abs=1e-6)


def held_out_kl(make_recipe, teacher_dir, **distill):
    path = make_recipe(
        method={"kind": "distill", "distill": {"teacher": str(teacher_dir), **distill}}, eval={"before_after": True}
    )
    recipe, recipe_dir = load_recipe(path)
    result = run_recipe(recipe, recipe_dir)
    return result, result.summary["eval"]["before"], result.summary["eval"]["after"]


def test_offline_distillation_lowers_the_held_out_kl_to_the_teacher(make_recipe, teacher_dir, tmp_path):
    result, before, after = held_out_kl(make_recipe, teacher_dir)
    assert before["n"] == after["n"] == 6
    # Measured: 5.49 -> 4.90 nats per response token in 6 LoRA steps.
    assert after["kl_to_teacher"] < before["kl_to_teacher"] - 0.3, (before, after)
    assert result.summary["eval"]["delta"]["kl_to_teacher"] < 0
    assert json.loads((result.run.path / "eval" / "after.json").read_text()) == after
    assert (result.run.final / "adapter_config.json").is_file()
    # Plain cross-entropy on the same rows learns the data's answers, not the teacher's: the KL hardly moves.
    (tmp_path / "run").rename(tmp_path / "run-distill")
    _, _, ce_only = held_out_kl(make_recipe, teacher_dir, ce_weight=1.0)
    assert after["kl_to_teacher"] < ce_only["kl_to_teacher"] - 0.3, (after, ce_only)


def test_on_policy_distillation_trains_on_the_students_samples(make_recipe, teacher_dir):
    result, before, after = held_out_kl(make_recipe, teacher_dir, mode="on_policy", loss="jsd", max_new_tokens=12)
    assert after["kl_to_teacher"] < before["kl_to_teacher"] - 0.1, (before, after)
    rows = [r for r in result.run.read_metrics() if "completions/mean_length" in r]
    assert rows and all(0 < r["completions/mean_length"] <= 12 for r in rows)  # TRL sampled from the student
    assert result.summary["train"]["steps"] == 6


def test_a_teacher_with_another_vocabulary_is_refused_before_training(make_recipe, tiny_tokenizer, tmp_path):
    teacher = tmp_path / "wide-vocab-teacher"
    tiny_llama(tiny_tokenizer, hidden=64, extra_vocab=16).save_pretrained(teacher)
    path = make_recipe(method={"kind": "distill", "distill": {"teacher": str(teacher)}})
    recipe, recipe_dir = load_recipe(path)
    with pytest.raises(UserError) as info:
        run_recipe(recipe, recipe_dir)
    message = str(info.value)
    n = len(tiny_tokenizer)
    assert message.startswith(f"method.distill.teacher: the teacher's vocabulary has {n + 16} tokens and the student's")
    assert f"{n};" in message and "both models must use one tokenizer" in message
    assert not (tmp_path / "run" / "checkpoints").is_dir() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "distill, adapter, problem",
    [
        ({}, None, "method.distill.teacher: needs a teacher model"),
        ({"teacher": "t", "beta": 0.3}, None, "method.distill.beta: applies to loss jsd only, not forward_kl"),
        ({"teacher": "t", "mode": "on_policy", "ce_weight": 0.5}, None, "method.distill.ce_weight: applies to mode offline only"),
        ({"teacher": "t", "max_new_tokens": 8}, None, "method.distill.max_new_tokens: applies to mode on_policy only"),
        ({"teacher": "t", "mode": "on_policy"}, {"kind": "prefix"}, "adapter.kind: on-policy distillation"),
    ],
    ids=["no-teacher", "beta-without-jsd", "ce-on-policy", "new-tokens-offline", "prefix-on-policy"],
)
def test_options_that_do_not_fit_are_refused(distill, adapter, problem, make_recipe):
    sections = {"method": {"kind": "distill", "distill": distill}}
    if adapter:
        sections["adapter"] = adapter
    with pytest.raises(UserError) as info:
        load_recipe(make_recipe(**sections))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_gradient_accumulation_averages_over_the_tokens_of_the_whole_batch(make_recipe, teacher_dir, tmp_path):
    """The first step's loss of batch 4 equals that of batch 2 x 2 accumulation steps (same 4 rows, same
    weights): the loss is summed over response tokens and divided by the accumulated batch's token count.
    The answers differ in length, so a mean per micro-batch would weigh the tokens differently."""
    answers = ["Hello.", "Hello Ada!", "Hello Ada, you are number three.", " ".join(["Hello Ada, you are welcome."] * 6)]
    rows = [
        {"messages": [{"role": "user", "content": f"Greet Ada number {i}."}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(answers)
    ]
    write_jsonl(tmp_path / "four.jsonl", rows)
    losses = []
    for i, (batch, accum) in enumerate(((4, 1), (2, 2))):
        path = make_recipe(
            method={"kind": "distill", "distill": {"teacher": str(teacher_dir), "ce_weight": 0.3}},
            data={"sources": [{"path": str(tmp_path / "four.jsonl")}], "max_length": 128},
            train={
                "max_steps": 1,
                "batch_size": batch,
                "grad_accum": accum,
                "logging_steps": 1,
                "output_dir": str(tmp_path / f"run-{i}"),
            },
        )
        recipe, recipe_dir = load_recipe(path)
        losses.append(run_recipe(recipe, recipe_dir).summary["train"]["first_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4), losses


def test_plan_counts_the_teacher_from_its_config(make_recipe, teacher_dir):
    from transformers import AutoModelForCausalLM

    from llmtune.plan import estimate_memory

    method = {"kind": "distill", "distill": {"teacher": str(teacher_dir)}}
    plan = estimate_memory(load_recipe(make_recipe(method=method))[0], device="cpu")
    teacher_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher_dir).parameters())
    assert plan.gpu["teacher model"] == teacher_params * 4  # fp32 on CPU
    assert plan.gpu["teacher logits"] == plan.gpu["logits and loss"] and "generation KV cache" not in plan.gpu
    on_policy = estimate_memory(
        load_recipe(make_recipe(method=method | {"distill": {"teacher": str(teacher_dir), "mode": "on_policy"}}))[0], device="cpu"
    )
    assert on_policy.gpu["generation KV cache"] > 0
