import json

import pytest

from conftest import greeting_rows, write_jsonl
from llmtune.data import prepare_data
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
    assert tiny_tokenizer.decode([t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX]) == \
        "Hello Ada!<|im_end|>\nHello Bruno!<|im_end|>\n"


def test_training_prompt_equals_inference_prompt(tiny_tokenizer):
    input_ids, labels = tokenize_example(MULTI_TURN[:3], tiny_tokenizer, "model")
    first_loss = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    at_inference = tiny_tokenizer.apply_chat_template(MULTI_TURN[:2], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]
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
    rows = [good[0], "{not json", {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            {"text": "wrong format"}, {"messages": [{"role": "robot", "content": "x"}]}, good[1],
            {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]}, good[2]]
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
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    cfg = DataSection(sources=[{"path": "pc.jsonl", "format": "prompt_completion",
                                "columns": {"prompt": "question", "completion": "answer"}}], eval_fraction=0.25)
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
    test_customers = {json.loads(json.loads(l)["messages"][1]["content"])["customer"]
                      for l in (quickstart / "test.jsonl").read_text().splitlines()}
    assert not any(f'"customer": "{c}"' in t for c in test_customers for t in train_names)


def test_several_sources_are_mixed_before_holding_out(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(20)])
    cfg = DataSection(sources=[{"path": str(a), "format": "prompt_completion"},
                               {"path": str(b), "format": "prompt_completion"}], eval_fraction=0.5)
    data = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    held_out_from = {row[0]["content"][0] for row in data.eval_rows}
    assert held_out_from == {"a", "b"}


def test_mapped_columns_win_over_same_named_columns(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "stale", "question": "Greet Ada.", "completion": "Hi"}])
    cfg = DataSection(sources=[{"path": str(path), "format": "prompt_completion", "columns": {"prompt": "question"}}],
                      eval_sources=[{"path": str(path), "format": "prompt_completion", "columns": {"prompt": "question"}}])
    assert prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0).eval_rows[0][0]["content"] == "Greet Ada."


def test_held_out_rows_must_end_on_an_answer(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", greeting_rows(2))
    held = write_jsonl(tmp_path / "h.jsonl", [
        {"messages": greeting_rows(1)[0]["messages"] + [{"role": "user", "content": "And now?"}]},
        {"messages": [{"role": "assistant", "content": "Hello"}]},
    ] + greeting_rows(1))
    data = prepare_data(DataSection(sources=[{"path": str(train)}], eval_sources=[{"path": str(held)}]),
                        tmp_path, tiny_tokenizer, seed=0)
    assert len(data.eval_rows) == 1
    assert data.stats["dropped"]["held-out row does not end with a prompt and an assistant answer"]["first"] == ["h.jsonl:1", "h.jsonl:2"]
