"""Raw rows -> canonical examples, one function per declared format; RowError says what is wrong.

Canonical examples are plain dicts, so one renderer serves every format:

- chat formats (`messages`, `sharegpt`, `alpaca`, `prompt_completion`): {"messages": [{role, content}, ...]}
- `text`: {"text": str} (continued pre-training: loss on every token)
- `preference`: {"prompt": [messages], "chosen": [assistant turn], "rejected": [assistant turn]}
  (TRL's conversational preference layout)
- `prompt_only`: {"prompt": [messages]} (for PPO and GRPO rollouts)
- `feedback`: {"prompt": [messages], "completion": [assistant turn], "label": bool} (TRL's conversational
  unpaired-preference layout: one answer marked desirable or not, as KTO reads it)
- `classification`: {"text": str, "label": str}
"""

from __future__ import annotations

from typing import Any

from llmtune.recipe.schema import DataSource

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class RowError(ValueError):
    """A malformed row; the message is the drop reason."""


def to_canonical(row: Any, source: DataSource) -> dict:
    """One raw row as a canonical example of the source's format."""
    if isinstance(row, RowError):  # the reader could not even parse it
        raise row
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    # Mapped columns win over raw columns that happen to carry a format field's name.
    row = {k: v for k, v in row.items() if k not in source.columns.values()} | {
        name: row.get(column) for name, column in source.columns.items()
    }
    return FORMATS[source.format](row)


def _messages_row(row: dict) -> dict:
    return {"messages": _checked_chat(_messages(row, "messages"))}


def _sharegpt_row(row: dict) -> dict:
    messages = _sharegpt_turns(row, "conversations")
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages = [{"role": "system", "content": row["system"]}] + messages
    return {"messages": _checked_chat(messages)}


def _alpaca_row(row: dict) -> dict:
    instruction, output = _text(row, "instruction"), _text(row, "output")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError("field 'input' is not a string")
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        messages.append({"role": "system", "content": row["system"]})
    for turn in row.get("history") or []:  # LLaMA-Factory's alpaca variant: earlier [prompt, answer] pairs
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError("field 'history' is not a list of [prompt, answer] pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    if not prompt.strip():
        raise RowError("empty prompt")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return {"messages": _checked_chat(messages)}


def _prompt_completion_row(row: dict) -> dict:
    prompt, completion = _text(row, "prompt"), _text(row, "completion")
    return {"messages": _checked_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])}


def _text_row(row: dict) -> dict:
    text = _text(row, "text")
    if not text.strip():
        raise RowError("empty text")
    return {"text": text}


def _preference_row(row: dict) -> dict:
    """prompt + chosen + rejected, as text or messages; or two full transcripts sharing a prompt."""
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise RowError(f"missing field '{name}'")
    if row.get("prompt") is None and row.get("conversations") is None:
        # Whole conversations (hh-rlhf transcripts, or message lists) that differ only in the last answer.
        chosen_prompt, chosen = _split_last_answer(row["chosen"], "chosen")
        rejected_prompt, rejected = _split_last_answer(row["rejected"], "rejected")
        if chosen_prompt != rejected_prompt:
            raise RowError("'chosen' and 'rejected' do not share the same conversation before their last answer")
        prompt = chosen_prompt
    else:
        prompt = _sharegpt_turns(row, "conversations") if row.get("prompt") is None else _prompt(row)
        chosen, rejected = _answer(row["chosen"], "chosen"), _answer(row["rejected"], "rejected")
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("the prompt does not end with a user turn")
    if chosen == rejected:
        raise RowError("'chosen' and 'rejected' are identical")
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _feedback_row(row: dict) -> dict:
    """prompt + completion (text or messages, as in `preference`) + a true/false label."""
    if row.get("completion") is None:
        raise RowError("missing field 'completion'")
    prompt = _prompt(row)
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("the prompt does not end with a user turn")
    completion = _answer(row["completion"], "completion")
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": completion}], "label": _label(row)}


def _label(row: dict) -> bool:
    """A feedback label: true/false; CSV gives the words as text, some tables 1/0."""
    label = row.get("label")
    if label is None:
        raise RowError("missing field 'label'")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        return label.strip().lower() == "true"
    if isinstance(label, int) and label in (0, 1):  # bool is an int too
        return bool(label)
    raise RowError("field 'label' is not true or false")


def as_feedback(example: dict) -> list[dict]:
    """Feedback rows from a canonical example: a preference pair gives two, its chosen answer
    desirable (label true) and its rejected answer not; a feedback row stays itself."""
    if "chosen" not in example:
        return [example]
    return [
        {"prompt": example["prompt"], "completion": example["chosen"], "label": True},
        {"prompt": example["prompt"], "completion": example["rejected"], "label": False},
    ]


def _prompt_only_row(row: dict) -> dict:
    if row.get("prompt") is None and row.get("messages") is not None:
        messages = _messages(row, "messages")
        # A conversation ending with an answer gives its prompt; the answer is not used.
        prompt = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    else:
        prompt = _prompt(row)
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("the prompt does not end with a user turn")
    return {"prompt": prompt}


def _classification_row(row: dict) -> dict:
    label = row.get("label")
    if label is None:
        raise RowError("missing field 'label'")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise RowError("field 'label' is not a string or integer")
    text = _text(row, "text")
    if not text.strip():
        raise RowError("empty text")
    return {"text": text, "label": str(label)}


FORMATS = {
    "messages": _messages_row,
    "sharegpt": _sharegpt_row,
    "alpaca": _alpaca_row,
    "prompt_completion": _prompt_completion_row,
    "text": _text_row,
    "preference": _preference_row,
    "prompt_only": _prompt_only_row,
    "classification": _classification_row,
    "feedback": _feedback_row,
}
# What each format becomes, so later steps know how to render it.
KIND_OF_FORMAT = {
    "messages": "chat",
    "sharegpt": "chat",
    "alpaca": "chat",
    "prompt_completion": "chat",
    "text": "text",
    "preference": "preference",
    "prompt_only": "prompt",
    "classification": "classification",
    "feedback": "feedback",
}


# --- pieces shared by the formats -------------------------------------------------------------


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' is not a string")
    if name in ("completion", "output") and not value.strip():
        raise RowError("empty response")
    return value


def _content(message: dict, key: str) -> str:
    """A message's text; OpenAI-style content parts ([{type: text, text}, ...]) are joined."""
    content = message.get(key)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise RowError(f"a message's '{key}' is missing or not a string")
    return content


def _messages(row: dict, name: str) -> list[dict]:
    messages = row.get(name)
    if messages is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RowError(f"'{name}' is not a list of {{role, content}} objects")
    for m in messages:
        if m.get("role") not in ROLES:
            raise RowError(f"unknown role {m.get('role')!r} (expected one of {', '.join(ROLES)})")
    return [{"role": m["role"], "content": _content(m, "content")} for m in messages]


def _sharegpt_turns(row: dict, name: str) -> list[dict]:
    turns = row.get(name)
    if turns is None:
        raise RowError(f"missing field '{name}'")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise RowError(f"'{name}' is not a list of {{from, value}} objects")
    return [_sharegpt_turn(t) for t in turns]


def _sharegpt_turn(turn: dict) -> dict:
    speaker = turn.get("from")
    if not isinstance(speaker, str) or speaker.lower() not in SHAREGPT_ROLES:
        raise RowError(f"unknown speaker {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
    return {"role": SHAREGPT_ROLES[speaker.lower()], "content": _content(turn, "value")}


def _checked_chat(messages: list[dict]) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no assistant turn to learn from")
    if not messages[-1]["content"].strip() or not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise RowError("empty response")
    return messages


def _prompt(row: dict) -> list[dict]:
    """The `prompt` field: text (one user turn) or messages."""
    prompt = row.get("prompt")
    if prompt is None:
        raise RowError("missing field 'prompt'")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError("empty prompt")
        return [{"role": "user", "content": prompt}]
    return _messages(row, "prompt")


def _answer(value: Any, name: str) -> str:
    """A response given as text, one message, or a list whose last message is the answer."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1]
    if isinstance(value, dict):
        if "from" in value:
            turn = _sharegpt_turn(value)
        else:
            turn = {"role": value.get("role"), "content": _content(value, "content")}
        if turn["role"] != "assistant":
            raise RowError(f"'{name}' is not an assistant answer")
        value = turn["content"]
    if not isinstance(value, str):
        raise RowError(f"field '{name}' is not text or an assistant message")
    if not value.strip():
        raise RowError(f"empty '{name}' response")
    return value


def _split_last_answer(value: Any, name: str) -> tuple[list[dict], str]:
    """(prompt messages, last answer) of a full conversation: a message list or an hh-rlhf transcript."""
    if isinstance(value, list):
        messages = _messages({name: value}, name)
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError(f"'{name}' does not end with an assistant answer")
        return messages[:-1], _answer(messages[-1]["content"], name)
    if not isinstance(value, str):
        raise RowError(f"field '{name}' is not text or a list of messages")
    return _parse_hh(value, name)


def _parse_hh(transcript: str, name: str) -> tuple[list[dict], str]:
    """Split an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") at its last assistant turn."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0 or HH_HUMAN not in transcript[:cut]:
        raise RowError(f"'{name}' has no prompt and is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    messages = []
    rest = transcript[:cut]
    while rest:
        starts = {marker: rest.find(marker, 1) for marker in (HH_HUMAN, HH_ASSISTANT)}
        end = min([i for i in starts.values() if i > 0], default=len(rest))
        piece = rest[:end]
        role = "user" if piece.startswith(HH_HUMAN) else "assistant" if piece.startswith(HH_ASSISTANT) else None
        if role is None:
            raise RowError(f"'{name}' transcript does not start with '\\n\\nHuman:'")
        marker = HH_HUMAN if role == "user" else HH_ASSISTANT
        messages.append({"role": role, "content": piece[len(marker) :].strip()})
        rest = rest[end:]
    return messages, _answer(transcript[cut + len(HH_ASSISTANT) :].strip(), name)
