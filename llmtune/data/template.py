"""Render canonical messages to token ids with a loss mask.

The conversation is rendered piece by piece with the tokenizer's chat template: for each assistant
turn, the text up to it with `add_generation_prompt=True` (no loss), then the turn itself up to
the template's end-of-turn marker (loss). Each piece is tokenized on its own, so the prompt
tokens seen in training are exactly the tokens of `apply_chat_template(..., add_generation_prompt=True)`
that the model sees at inference.
"""

from __future__ import annotations

from llmtune.data.sources import RowError
from llmtune.errors import UserError

IGNORE_INDEX = -100  # label value that carries no loss (PyTorch's cross-entropy ignore_index)


def check_template(tokenizer, chat_template: str) -> None:
    if chat_template == "model" and not tokenizer.chat_template:
        raise UserError(
            "data.chat_template: the tokenizer has no chat template; set data.chat_template: none "
            "(plain prompt + completion + EOS) or use a chat model"
        )


def prompt_text(messages: list[dict], tokenizer, chat_template: str) -> str:
    """What the model is given at inference to produce the next assistant turn."""
    if chat_template == "none":
        return "".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_adds_special_tokens(chat_template: str) -> bool:
    """Whether prompts are tokenized with the tokenizer's own special tokens (BOS)."""
    return chat_template == "none"


def render_segments(messages: list[dict], tokenizer, chat_template: str) -> list[tuple[str, bool]]:
    """The conversation as (text, carries_loss) pieces whose concatenation is the full rendering."""
    if chat_template == "none":
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise RowError("data.chat_template none takes single prompt/completion rows only")
        return [(messages[0]["content"], False), (messages[1]["content"] + tokenizer.eos_token, True)]
    segments: list[tuple[str, bool]] = []
    done = ""
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages[: last_assistant + 1]):
        if message["role"] != "assistant":
            continue
        prompt = prompt_text(messages[:i], tokenizer, chat_template)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError(
                "data.chat_template: this template does not render conversations incrementally "
                "(earlier text changes when a turn is added), so loss masks cannot be placed safely"
            )
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def tokenize_example(messages: list[dict], tokenizer, chat_template: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE_INDEX on tokens that carry no loss."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, carries_loss) in enumerate(render_segments(messages, tokenizer, chat_template)):
        # A chat template writes its own special tokens (BOS included) as text; plain text gets the
        # tokenizer's own BOS on the prompt, as it would at inference.
        ids = tokenizer(text, add_special_tokens=prompt_adds_special_tokens(chat_template) and i == 0)["input_ids"]
        input_ids += ids
        labels += ids if carries_loss else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
