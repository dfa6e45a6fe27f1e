import json

import pytest
from conftest import greeting_rows, write_jsonl

from llmtune.data import prepare_data
from llmtune.data.collate import PackedRowsCollator
from llmtune.data.template import IGNORE_INDEX, prompt_text, tokenize_example
from llmtune.errors import UserError
from llmtune.recipe.schema import DataSection

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Greet Ada."},
    {"role": "assistant", "content": "Hello Ada!"},
    {"role": "user", "content": "Greet Bruno."},
    {"role": "assistant", "content": "Hello Bruno!"},
]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_loss_falls_exactly_on_assistant_turns(tiny_tokenizer):
    input_ids, labels = tokenize_example(MULTI_TURN, tiny_tokenizer, "model")
    # Build the expected mask by hand from the ChatML pieces.
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGreet Ada.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello Ada!<|im_end|>\n", True),
        ("<|im_start|>user\nGreet Bruno.<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello Bruno!<|im_end|>\n", True),
    ]
    expected_ids, expected_mask = [], []
    for text, loss in pieces:
        piece = ids(tiny_tokenizer, text)
        expected_ids += piece
        expected_mask += [loss] * len(piece)
    assert input_ids == expected_ids
    assert [label != IGNORE_INDEX for label in labels] == expected_mask
    assert [t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX] == [t for t, m in zip(input_ids, expected_mask) if m]
    assert (
        tiny_tokenizer.decode([t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX])
        == "Hello Ada!<|im_end|>\nHello Bruno!<|im_end|>\n"
    )


def test_training_prompt_equals_inference_prompt(tiny_tokenizer):
    input_ids, labels = tokenize_example(MULTI_TURN[:3], tiny_tokenizer, "model")
    first_loss = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    at_inference = tiny_tokenizer.apply_chat_template(
        MULTI_TURN[:2], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert input_ids[:first_loss] == list(at_inference)
    assert prompt_text(MULTI_TURN[:2], tiny_tokenizer, "model") == tiny_tokenizer.decode(input_ids[:first_loss])


def test_plain_template_appends_eos_and_masks_prompt(tiny_tokenizer):
    messages = [{"role": "user", "content": "Greet Ada."}, {"role": "assistant", "content": " Hello"}]
    input_ids, labels = tokenize_example(messages, tiny_tokenizer, "none")
    assert input_ids[-1] == tiny_tokenizer.eos_token_id
    n_prompt = len(tiny_tokenizer("Greet Ada.")["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == input_ids[n_prompt:]


def test_malformed_rows_are_counted_per_reason_with_row_numbers(tmp_path, tiny_tokenizer):
    good = greeting_rows(3)
    rows = [
        good[0],
        "{not json",
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"text": "wrong format"},
        {"messages": [{"role": "robot", "content": "x"}]},
        good[1],
        {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]},
        good[2],
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(DataSection(sources=[{"path": str(path)}], max_length=64), tmp_path, tiny_tokenizer, seed=0)
    assert data.stats["train_rows"] == 3
    dropped = data.stats["dropped"]
    assert dropped["not valid JSON"] == {"rows": 1, "first": ["d.jsonl:2"]}
    assert dropped["no assistant turn to learn from"] == {"rows": 1, "first": ["d.jsonl:3"]}
    assert dropped["empty response"] == {"rows": 1, "first": ["d.jsonl:4"]}
    assert dropped["missing field 'messages'"] == {"rows": 1, "first": ["d.jsonl:5"]}
    assert dropped["unknown role 'robot' (expected one of system, user, assistant)"]["first"] == ["d.jsonl:6"]
    assert dropped["longer than data.max_length=64 tokens"]["first"] == ["d.jsonl:8"]


def test_strict_mode_fails_on_the_first_bad_row(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", greeting_rows(2) + [{"text": "x"}])
    with pytest.raises(UserError, match=r"d.jsonl:3: missing field 'messages'.*data.strict"):
        prepare_data(DataSection(sources=[{"path": str(path)}], strict=True), tmp_path, tiny_tokenizer, seed=0)


def test_prompt_completion_columns_and_eval_fraction(tmp_path, tiny_tokenizer):
    rows = [{"question": f"Greet {i}.", "answer": f"Hello {i}!"} for i in range(20)]
    write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = DataSection(
        sources=[{"path": "pc.jsonl", "format": "prompt_completion", "columns": {"prompt": "question", "completion": "answer"}}],
        eval_fraction=0.25,
    )
    data = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    assert (data.stats["train_rows"], data.stats["eval_rows"]) == (15, 5)
    assert data.eval_rows[0][-1]["content"].startswith("Hello ")
    assert data.fingerprints["pc.jsonl"].startswith("sha256:")


def test_same_seed_same_order_and_max_samples(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", greeting_rows(20))
    cfg = DataSection(sources=[{"path": str(path), "max_samples": 7}])
    a = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=1).train["input_ids"]
    b = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=1).train["input_ids"]
    c = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=2).train["input_ids"]
    assert a == b and len(a) == 7 and a != c


def test_missing_source_and_missing_template(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="no file matches"):
        prepare_data(DataSection(sources=[{"path": "nope.jsonl"}]), tmp_path, tiny_tokenizer, seed=0)
    tiny_tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", greeting_rows(2))
    with pytest.raises(UserError, match="data.chat_template: the tokenizer has no chat template"):
        prepare_data(DataSection(sources=[{"path": str(path)}]), tmp_path, tiny_tokenizer, seed=0)


def test_shipped_quickstart_data_equals_its_generator(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "recipes" / "data"
    spec = importlib.util.spec_from_file_location("make_quickstart_data", root / "make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(out_dir=tmp_path)
    for task in ("quickstart", "intent"):
        for split in ("train", "test"):
            assert (tmp_path / task / f"{split}.jsonl").read_text() == (root / task / f"{split}.jsonl").read_text()
    quickstart = tmp_path / "quickstart"
    train_names = {json.loads(l)["messages"][1]["content"] for l in (quickstart / "train.jsonl").read_text().splitlines()}
    test_customers = {
        json.loads(json.loads(l)["messages"][1]["content"])["customer"]
        for l in (quickstart / "test.jsonl").read_text().splitlines()
    }
    assert not any(f'"customer": "{c}"' in t for c in test_customers for t in train_names)


def test_several_sources_are_mixed_before_holding_out(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(20)])
    cfg = DataSection(
        sources=[{"path": str(a), "format": "prompt_completion"}, {"path": str(b), "format": "prompt_completion"}],
        eval_fraction=0.5,
    )
    data = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    held_out_from = {row[0]["content"][0] for row in data.eval_rows}
    assert held_out_from == {"a", "b"}


def test_mapped_columns_win_over_same_named_columns(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "stale", "question": "Greet Ada.", "completion": "Hi"}])
    cfg = DataSection(
        sources=[{"path": str(path), "format": "prompt_completion", "columns": {"prompt": "question"}}],
        eval_sources=[{"path": str(path), "format": "prompt_completion", "columns": {"prompt": "question"}}],
    )
    assert prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0).eval_rows[0][0]["content"] == "Greet Ada."


def test_held_out_rows_must_end_on_an_answer(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", greeting_rows(2))
    held = write_jsonl(
        tmp_path / "h.jsonl",
        [
            {"messages": greeting_rows(1)[0]["messages"] + [{"role": "user", "content": "And now?"}]},
            {"messages": [{"role": "assistant", "content": "Hello"}]},
        ]
        + greeting_rows(1),
    )
    data = prepare_data(
        DataSection(sources=[{"path": str(train)}], eval_sources=[{"path": str(held)}]), tmp_path, tiny_tokenizer, seed=0
    )
    assert len(data.eval_rows) == 1
    assert data.stats["dropped"]["held-out row does not end with a prompt and an assistant answer"]["first"] == [
        "h.jsonl:1",
        "h.jsonl:2",
    ]


def test_loss_on_last_turn_and_all_tokens(tiny_tokenizer):
    input_ids, assistant_labels = tokenize_example(MULTI_TURN, tiny_tokenizer, "model")
    ids_last, last = tokenize_example(MULTI_TURN, tiny_tokenizer, "model", loss_on="last_turn")
    ids_all, every = tokenize_example(MULTI_TURN, tiny_tokenizer, "model", loss_on="all")
    assert ids_last == ids_all == input_ids
    assert every == input_ids
    second_answer = ids(tiny_tokenizer, "Hello Bruno!<|im_end|>\n")
    assert [t for t in last if t != IGNORE_INDEX] == second_answer
    assert last[-len(second_answer) :] == second_answer  # the final positions, exactly
    assert sum(t != IGNORE_INDEX for t in assistant_labels) == len(second_answer) + len(
        ids(tiny_tokenizer, "Hello Ada!<|im_end|>\n")
    )


def test_named_and_file_chat_templates(tmp_path, tiny_tokenizer):
    from conftest import CHATML

    path = write_jsonl(tmp_path / "d.jsonl", greeting_rows(3))
    tiny_tokenizer.chat_template = None
    data = prepare_data(DataSection(sources=[{"path": str(path)}], chat_template="chatml"), tmp_path, tiny_tokenizer, seed=0)
    assert tiny_tokenizer.chat_template.startswith("{% for message in messages %}<|im_start|>")
    assert data.stats["train_rows"] == 3
    (tmp_path / "mine.jinja").write_text(CHATML)
    tiny_tokenizer.chat_template = None
    prepare_data(DataSection(sources=[{"path": str(path)}], chat_template="mine.jinja"), tmp_path, tiny_tokenizer, seed=0)
    assert tiny_tokenizer.chat_template == CHATML
    with pytest.raises(UserError, match="llama3 needs the special tokens <|start_header_id|>"):
        prepare_data(DataSection(sources=[{"path": str(path)}], chat_template="llama3"), tmp_path, tiny_tokenizer, seed=0)
    with pytest.raises(UserError, match="neither model, none, a named template"):
        prepare_data(DataSection(sources=[{"path": str(path)}], chat_template="nope.jinja"), tmp_path, tiny_tokenizer, seed=0)


def test_weighted_mixture_draws_exact_counts(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(100)])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(100)])
    sources = [
        {"path": "a.jsonl", "format": "prompt_completion", "weight": 0.7},
        {"path": "b.jsonl", "format": "prompt_completion", "weight": 0.3},
    ]
    data = prepare_data(DataSection(sources=sources), tmp_path, tiny_tokenizer, seed=0)
    # The largest 70/30 draw that repeats no row: 142 rows (100 / 0.7), split 99 / 43 by largest remainder.
    assert data.stats["sources"] == {
        "a.jsonl": {"available": 100, "drawn": 99, "share": 0.6972},
        "b.jsonl": {"available": 100, "drawn": 43, "share": 0.3028},
    }
    assert data.stats["train_rows"] == 142
    data = prepare_data(DataSection(sources=sources, mixture_size=300), tmp_path, tiny_tokenizer, seed=0)
    assert data.stats["sources"]["a.jsonl"] == {"available": 100, "drawn": 210, "share": 0.7, "repeated_rows": 110}
    assert data.stats["sources"]["b.jsonl"]["drawn"] == 90
    prompts = [tiny_tokenizer.decode(i) for i in data.train["input_ids"]]
    assert sum("a" in p.split("user\n")[1][:1] for p in prompts) == 210


def test_exact_dedup_within_training_and_against_held_out(tmp_path, tiny_tokenizer):
    rows = greeting_rows(4)
    write_jsonl(tmp_path / "t.jsonl", rows + [rows[0], rows[1]])
    write_jsonl(tmp_path / "h.jsonl", [rows[2]] + greeting_rows(1, offset=50))
    cfg = DataSection(sources=[{"path": "t.jsonl"}], eval_sources=[{"path": "h.jsonl"}], dedup=True)
    data = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    assert data.stats["train_rows"] == 4 and data.stats["eval_rows"] == 1
    assert data.stats["dropped"]["exact duplicate of an earlier training row"]["rows"] == 2
    assert data.stats["dropped"]["held-out row also in the training rows"]["first"] == ["h.jsonl:1"]


def test_tokenized_data_is_cached_by_content_tokenizer_and_settings(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", greeting_rows(5))
    cfg = DataSection(sources=[{"path": str(path)}], eval_fraction=0.2)
    first = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    again = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    assert "cached" not in first.stats and "cached" in again.stats
    assert again.train["input_ids"] == first.train["input_ids"] and again.eval_rows == first.eval_rows
    assert "cached" not in prepare_data(cfg.model_copy(update={"loss_on": "all"}), tmp_path, tiny_tokenizer, seed=0).stats
    assert "cached" not in prepare_data(cfg, tmp_path, tiny_tokenizer, seed=1).stats
    write_jsonl(path, greeting_rows(5, offset=1))
    assert "cached" not in prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0).stats
    tiny_tokenizer.chat_template = tiny_tokenizer.chat_template.replace("\n", "\n\n")
    assert "cached" not in prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0).stats


def varied_rows(n: int) -> list[dict]:
    words = "the quick brown fox jumps over a lazy dog".split()
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(words[: 1 + i % 9])},
                {"role": "assistant", "content": " ".join(words[i % 5 :] * (1 + i % 3))},
            ]
        }
        for i in range(n)
    ]


def per_example_losses(model, input_ids, labels, position_ids=None, seq_lengths=None):
    """Summed token losses of each example in a batch of (possibly packed) rows, by example's input ids.

    `seq_lengths`: the example lengths of each row (padding after them is ignored); None: one example a row.
    """
    import torch

    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    out = {}
    for row, lengths in enumerate(seq_lengths or [[input_ids.shape[1]]] * input_ids.shape[0]):
        start = 0
        for n in lengths:
            seg_logits, seg_labels = logits[row, start : start + n - 1], labels[row, start + 1 : start + n]
            loss = torch.nn.functional.cross_entropy(seg_logits, seg_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            out[tuple(input_ids[row, start : start + n].tolist())] = loss.item()
            start += n
    return out


def test_packed_examples_keep_their_unpacked_losses(tmp_path, tiny_model_dir, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    write_jsonl(tmp_path / "d.jsonl", varied_rows(24))
    unpacked = prepare_data(DataSection(sources=[{"path": "d.jsonl"}], max_length=64), tmp_path, tiny_tokenizer, seed=0)
    packed = prepare_data(
        DataSection(sources=[{"path": "d.jsonl"}], max_length=64, packing=True), tmp_path, tiny_tokenizer, seed=0
    )
    assert packed.stats["packing"]["rows"] < len(unpacked.train) and packed.stats["packing"]["fill"] > 0.8
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    alone = {}
    for row in unpacked.train:
        alone |= per_example_losses(model, torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]]))
    collate = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True)
    together, leaky = {}, {}
    for row in packed.train:
        batch = collate([row])
        assert "attention_mask" not in batch  # the mask is derived from position ids, per example
        together |= per_example_losses(model, batch["input_ids"], batch["labels"], batch["position_ids"], [row["seq_lengths"]])
        leaky |= per_example_losses(model, batch["input_ids"], batch["labels"], None, [row["seq_lengths"]])
    assert together.keys() == alone.keys()
    assert max(abs(together[k] - alone[k]) for k in alone) < 1e-5
    # Without position ids restarting per example the examples would see each other: the check can fail.
    assert max(abs(leaky[k] - alone[k]) for k in alone) > 1e-3

    # sdpa/eager (CPU): all packed rows in one batch, kept apart and padded to the longest, no attention mask.
    rows = list(packed.train)
    batch = PackedRowsCollator(tiny_tokenizer.pad_token_id)(rows)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(rows)
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE_INDEX).all()
    apart = per_example_losses(
        model, batch["input_ids"], batch["labels"], batch["position_ids"], [row["seq_lengths"] for row in rows]
    )
    assert apart.keys() == alone.keys()
    assert max(abs(apart[k] - alone[k]) for k in alone) < 1e-5

    # The trainer's own loss on all packed rows in one batch is the token mean of the unpacked losses.
    from trl import SFTConfig

    from llmtune.methods.sft import _sft_trainer_class

    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        packing=True,
        max_length=64,
        report_to="none",
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = _sft_trainer_class()(model=model, args=args, train_dataset=packed.train, processing_class=tiny_tokenizer)
    n_tokens = sum(sum(t != IGNORE_INDEX for t in row["labels"][1:]) for row in unpacked.train)
    for collate in (trainer.data_collator, PackedRowsCollator(tiny_tokenizer.pad_token_id)):  # one sequence; rows apart
        with torch.no_grad():
            loss = trainer.compute_loss(model, collate(list(packed.train))).item()
        assert abs(loss - sum(alone.values()) / n_tokens) < 1e-5
