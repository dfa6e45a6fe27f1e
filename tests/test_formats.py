"""Every data format, file type and row check: what each row becomes, and why a row is dropped."""

import csv

import pytest
from conftest import write_jsonl

from llmtune.data import prepare_data
from llmtune.data.formats import RowError, to_canonical
from llmtune.errors import UserError
from llmtune.recipe.schema import DataSection, DataSource


def canonical(row, fmt, **kw):
    return to_canonical(row, DataSource(path="x.jsonl", format=fmt, **kw))


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_chat_formats_become_messages():
    assert canonical({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca") == {
        "messages": [user("Add\n\n1 2"), assistant("3")]
    }
    assert canonical(
        {"instruction": "Hi", "input": "", "output": "Hello", "system": "Be kind.", "history": [["a", "b"]]}, "alpaca"
    ) == {"messages": [{"role": "system", "content": "Be kind."}, user("a"), assistant("b"), user("Hi"), assistant("Hello")]}
    assert canonical(
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "S"}, "sharegpt"
    ) == {"messages": [{"role": "system", "content": "S"}, user("Hi"), assistant("Hello")]}
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "He"}, {"type": "text", "text": "llo"}]},
            assistant("Hi"),
        ]
    }
    assert canonical(parts, "messages") == {"messages": [user("Hello"), assistant("Hi")]}
    assert canonical({"q": "Hi", "a": "Hello"}, "prompt_completion", columns={"prompt": "q", "completion": "a"}) == {
        "messages": [user("Hi"), assistant("Hello")]
    }
    assert canonical({"text": "Once upon a time"}, "text") == {"text": "Once upon a time"}


def test_preference_rows_in_every_layout():
    expected = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}
    assert canonical({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "preference") == expected
    assert (
        canonical({"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}, "preference")
        == expected
    )
    # Full conversations sharing everything but the last answer.
    assert (
        canonical({"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]}, "preference")
        == expected
    )
    # ShareGPT preference (LLaMA-Factory's dpo layout).
    assert (
        canonical(
            {
                "conversations": [{"from": "human", "value": "Hi"}],
                "chosen": {"from": "gpt", "value": "Hello!"},
                "rejected": {"from": "gpt", "value": "Go away."},
            },
            "preference",
        )
        == expected
    )
    # hh-rlhf transcripts: split at the last assistant turn, earlier turns become messages.
    hh = "\n\nHuman: Hi\n\nAssistant: Hey.\n\nHuman: How are you?\n\nAssistant:"
    row = canonical({"chosen": hh + " Fine, thanks.", "rejected": hh + " Leave me alone."}, "preference")
    assert row == {
        "prompt": [user("Hi"), assistant("Hey."), user("How are you?")],
        "chosen": [assistant("Fine, thanks.")],
        "rejected": [assistant("Leave me alone.")],
    }


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Hi", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "Hi", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are identical"),
        ({"prompt": "Hi", "chosen": " ", "rejected": "a"}, "empty 'chosen' response"),
        ({"chosen": "plain text", "rejected": "other"}, "has no prompt and is not a"),
        (
            {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
            "do not share the same conversation",
        ),
        ({"prompt": "Hi", "chosen": 3, "rejected": "a"}, "field 'chosen' is not text or an assistant message"),
    ],
)
def test_malformed_preference_rows(row, reason):
    with pytest.raises(RowError, match=reason):
        canonical(row, "preference")


def test_feedback_rows_in_every_layout():
    expected = {"prompt": [user("Hi")], "completion": [assistant("Hello!")], "label": True}
    assert canonical({"prompt": "Hi", "completion": "Hello!", "label": True}, "feedback") == expected
    assert canonical({"prompt": [user("Hi")], "completion": [assistant("Hello!")], "label": True}, "feedback") == expected
    assert canonical({"prompt": "Hi", "completion": assistant("Hello!"), "label": "TRUE"}, "feedback") == expected
    assert (
        canonical({"q": "Hi", "a": "Hello!", "ok": 1}, "feedback", columns={"prompt": "q", "completion": "a", "label": "ok"})
        == expected
    )
    for false in (False, "false", " False ", 0):
        assert canonical({"prompt": "Hi", "completion": "Go away.", "label": false}, "feedback")["label"] is False


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Hi", "completion": "a"}, "missing field 'label'"),
        ({"prompt": "Hi", "completion": "a", "label": "yes"}, "field 'label' is not true or false"),
        ({"prompt": "Hi", "completion": "a", "label": 2}, "field 'label' is not true or false"),
        ({"prompt": "Hi", "label": True}, "missing field 'completion'"),
        ({"prompt": "Hi", "completion": " ", "label": True}, "empty 'completion' response"),
        ({"prompt": [user("Hi"), assistant("Hello")], "completion": "a", "label": True}, "does not end with a user turn"),
        ({"prompt": "Hi", "completion": user("a"), "label": True}, "'completion' is not an assistant answer"),
    ],
)
def test_malformed_feedback_rows(row, reason):
    with pytest.raises(RowError, match=reason):
        canonical(row, "feedback")


def test_feedback_data_in_trl_conversational_layout(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Greet {n}.", "completion": f"Hello {n}!", "label": True} for n in ("Ada", "Bruno", "Chen")]
    rows += [
        {"prompt": "Greet Dana.", "completion": "No.", "label": False},
        {"prompt": "Greet Emeka.", "completion": "x " * 100, "label": False},
        {"prompt": "Greet Farah.", "completion": "Hi", "label": "maybe"},
    ]
    write_jsonl(tmp_path / "f.jsonl", rows)
    data = prepare_data(
        DataSection(sources=[{"path": "f.jsonl", "format": "feedback"}], max_length=48),
        tmp_path,
        tiny_tokenizer,
        seed=0,
        examples="feedback",
    )
    assert data.kind == "feedback" and set(data.train.column_names) == {"prompt", "completion", "label"}
    assert data.stats["labels"] == {"desirable": 3, "undesirable": 1}
    assert data.stats["dropped"]["longer than data.max_length=48 tokens"]["first"] == ["f.jsonl:5"]
    assert data.stats["dropped"]["field 'label' is not true or false"]["first"] == ["f.jsonl:6"]
    assert data.train[0]["completion"][0]["role"] == "assistant" and data.train[0]["prompt"][-1]["role"] == "user"


def test_preference_pairs_become_two_feedback_rows_for_a_method_that_reads_feedback(tmp_path, tiny_tokenizer):
    pairs = [
        {"prompt": f"Greet {n} number {i}.", "chosen": f"Hello {n}!", "rejected": "No."}
        for i, n in enumerate(["Ada", "Bruno", "Chen", "Dana", "Emeka"] * 4)
    ]
    write_jsonl(tmp_path / "p.jsonl", pairs)
    cfg = DataSection(sources=[{"path": "p.jsonl", "format": "preference"}], eval_fraction=0.25)
    data = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0, examples="feedback")
    assert data.kind == "feedback" and set(data.train.column_names) == {"prompt", "completion", "label"}
    assert len(data.train) == 2 * 15 and len(data.eval) == 2 * 5 and data.stats["labels"] == {"desirable": 15, "undesirable": 15}
    # Each pair gave one desirable row (its chosen answer) and one undesirable row (its rejected answer) ...
    for rows in (list(data.train), data.eval_rows):
        by_prompt = {}
        for row in rows:
            by_prompt.setdefault(row["prompt"][0]["content"], []).append((row["label"], row["completion"][0]["content"]))
        assert all(sorted(answers) == [(False, "No."), (True, f"Hello {p.split()[1]}!")] for p, answers in by_prompt.items())
    # ... the held-out split kept both rows of a pair on the same side, and the training rows are
    # shuffled after unpairing: a pair's two rows are not left next to each other.
    held_out = {row["prompt"][0]["content"] for row in data.eval_rows}
    assert not held_out & {row["prompt"][0]["content"] for row in data.train}
    prompts = [row["prompt"][0]["content"] for row in data.train]
    assert sum(a == b for a, b in zip(prompts, prompts[1:])) <= 3
    # The same rows read by a preference method stay pairs.
    assert prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0, examples="preference").kind == "preference"


def test_prompt_only_rows():
    assert canonical({"prompt": "Hi"}, "prompt_only") == {"prompt": [user("Hi")]}
    assert canonical({"messages": [user("Hi"), assistant("Hello")]}, "prompt_only") == {"prompt": [user("Hi")]}
    with pytest.raises(RowError, match="does not end with a user turn"):
        canonical({"prompt": [user("Hi"), assistant("Hello")]}, "prompt_only")
    with pytest.raises(RowError, match="unknown speaker 'robot'"):
        canonical({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")


def test_csv_and_parquet_sources_with_row_numbers(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerows([["Greet Ada.", "Hello Ada!"], ["Greet Bruno.", ""], ["only one field"]])
    with open(tmp_path / "d.csv", "ab") as f:
        f.write(b"Greet \xff.,Hello\n")
    pq.write_table(
        pa.table({"prompt": ["Greet Chen.", "Greet Dana."], "completion": ["Hello Chen!", None]}), tmp_path / "d.parquet"
    )
    cfg = DataSection(sources=[{"path": "d.*", "format": "prompt_completion"}])
    data = prepare_data(cfg, tmp_path, tiny_tokenizer, seed=0)
    assert data.stats["train_rows"] == 2
    dropped = data.stats["dropped"]
    assert dropped["empty response"]["first"] == ["d.csv:3"]
    assert dropped["CSV row does not have as many fields as the header"]["first"] == ["d.csv:4"]
    assert dropped["undecodable text (not UTF-8)"]["first"] == ["d.csv:5"]
    assert dropped["missing field 'completion'"]["first"] == ["d.parquet:2"]
    assert set(data.fingerprints) == {"d.*"}


def test_unsupported_file_and_broken_json_file(tmp_path, tiny_tokenizer):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UserError, match=r"unsupported file type '.txt'"):
        prepare_data(DataSection(sources=[{"path": "d.txt"}]), tmp_path, tiny_tokenizer, seed=0)
    (tmp_path / "d.json").write_text("[{")
    with pytest.raises(UserError, match="not valid UTF-8 JSON"):
        prepare_data(DataSection(sources=[{"path": "d.json"}]), tmp_path, tiny_tokenizer, seed=0)


def test_preference_and_prompt_data_in_trl_conversational_layout(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Greet {n}.", "chosen": f"Hello {n}!", "rejected": "No."} for n in ("Ada", "Bruno", "Chen")]
    rows.append({"prompt": "Greet " + "x " * 100, "chosen": "Hi", "rejected": "No."})
    write_jsonl(tmp_path / "p.jsonl", rows)
    data = prepare_data(
        DataSection(sources=[{"path": "p.jsonl", "format": "preference"}], max_length=48), tmp_path, tiny_tokenizer, seed=0
    )
    assert data.kind == "preference" and set(data.train.column_names) == {"prompt", "chosen", "rejected"}
    assert len(data.train) == 3 and data.stats["dropped"]["longer than data.max_length=48 tokens"]["rows"] == 1
    assert data.train[0]["chosen"][0]["role"] == "assistant"
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Greet Ada."}, {"prompt": ""}])
    data = prepare_data(DataSection(sources=[{"path": "q.jsonl", "format": "prompt_only"}]), tmp_path, tiny_tokenizer, seed=0)
    assert data.kind == "prompt" and data.train.column_names == ["prompt"] and len(data.train) == 1
    assert data.stats["dropped"]["empty prompt"]["first"] == ["q.jsonl:2"]


def test_text_rows_carry_loss_everywhere_and_long_ones_are_cut(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 6}])
    data = prepare_data(
        DataSection(sources=[{"path": "t.jsonl", "format": "text"}], max_length=16), tmp_path, tiny_tokenizer, seed=0
    )
    pieces = data.train["input_ids"]
    assert len(pieces) > 1 and all(len(p) <= 16 for p in pieces)
    assert data.train["labels"] == pieces  # every token carries loss
    assert sum(pieces, [])[-1] == tiny_tokenizer.eos_token_id
    assert "dropped" in data.stats and not data.stats["dropped"]


def test_recipe_rejects_a_format_the_method_cannot_read():
    from pydantic import ValidationError

    from llmtune.recipe.schema import Recipe

    with pytest.raises(ValidationError, match=r"data.sources\[0\].format: method.kind sft reads .* not preference"):
        Recipe(data={"sources": [{"path": "p.jsonl", "format": "preference"}]})
    with pytest.raises(ValidationError, match="prompt tuning prepends virtual tokens"):
        Recipe(data={"sources": [{"path": "p.jsonl"}], "packing": True}, adapter={"kind": "prompt"})
    with pytest.raises(ValidationError, match="give every source a weight, or none"):
        Recipe(data={"sources": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]})
