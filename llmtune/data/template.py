"""Render canonical messages to token ids with a loss mask.

The conversation is rendered piece by piece with the tokenizer's chat template: for each assistant
turn, the text up to it with `add_generation_prompt=True` (no loss), then the turn itself up to
the template's end-of-turn marker (loss). Each piece is tokenized on its own, so the prompt
tokens seen in training are exactly the tokens of `apply_chat_template(..., add_generation_prompt=True)`
that the model sees at inference.
"""

from __future__ import annotations

from pathlib import Path

from llmtune.data.formats import RowError
from llmtune.errors import UserError

IGNORE_INDEX = -100  # label value that carries no loss (PyTorch's cross-entropy ignore_index)

# Templates a recipe can name instead of the model's own, with the special tokens each needs as
# single tokens of the vocabulary (otherwise the markers would be learned as ordinary text).
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "zephyr": (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
        [],
    ),
}


def set_chat_template(tokenizer, chat_template: str, base_dir: Path) -> None:
    """Resolve data.chat_template onto the tokenizer (saved with it, so inference renders the same way)."""
    if chat_template == "none":
        return
    if chat_template == "model":
        if not tokenizer.chat_template:
            raise UserError(
                "data.chat_template: the tokenizer has no chat template; name one (chatml, llama3, zephyr), give a "
                ".jinja file, set data.chat_template: none (plain prompt + completion + EOS), or use a chat model"
            )
        return
    if chat_template in NAMED_TEMPLATES:
        template, markers = NAMED_TEMPLATES[chat_template]
        vocab = tokenizer.get_vocab()
        missing = [m for m in markers if m not in vocab]
        if missing:
            raise UserError(
                f"data.chat_template: {chat_template} needs the special tokens {', '.join(missing)}, "
                "which this tokenizer lacks; use the model's own template or another one"
            )
    else:
        path = Path(chat_template).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise UserError(
                f"data.chat_template: {chat_template!r} is neither model, none, a named template "
                f"({', '.join(NAMED_TEMPLATES)}) nor an existing .jinja file"
            )
        template = path.read_text()
    tokenizer.chat_template = template


def prompt_text(messages: list[dict], tokenizer, chat_template: str) -> str:
    """What the model is given at inference to produce the next assistant turn."""
    if chat_template == "none":
        return "".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_adds_special_tokens(chat_template: str) -> bool:
    """Whether prompts are tokenized with the tokenizer's own special tokens (BOS)."""
    return chat_template == "none"


def render_segments(messages: list[dict], tokenizer, chat_template: str, loss_on: str = "assistant") -> list[tuple[str, bool]]:
    """The conversation as (text, carries_loss) pieces whose concatenation is the full rendering.

    `loss_on`: `assistant` (every assistant turn with its end-of-turn marker), `last_turn` (the
    final assistant turn only) or `all` (every token, the prompts included).
    """
    segments = _segments(messages, tokenizer, chat_template)
    if loss_on == "all":
        return [(text, True) for text, _ in segments]
    if loss_on == "last_turn":
        return [(text, carries and i == len(segments) - 1) for i, (text, carries) in enumerate(segments)]
    return segments


def _segments(messages: list[dict], tokenizer, chat_template: str) -> list[tuple[str, bool]]:
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
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return segments


def tokenize_example(
    messages: list[dict], tokenizer, chat_template: str, loss_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE_INDEX on tokens that carry no loss."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, carries_loss) in enumerate(render_segments(messages, tokenizer, chat_template, loss_on)):
        # A chat template writes its own special tokens (BOS included) as text; plain text gets the
        # tokenizer's own BOS on the prompt, as it would at inference.
        ids = tokenizer(text, add_special_tokens=prompt_adds_special_tokens(chat_template) and i == 0)["input_ids"]
        input_ids += ids
        labels += ids if carries_loss else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def tokenize_text(text: str, tokenizer, max_length: int) -> list[list[int]]:
    """Plain text for continued pre-training: BOS (if the tokenizer adds one) + text + EOS, every
    token carrying loss, cut into max_length pieces rather than dropped (documents are often long)."""
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[i : i + max_length] for i in range(0, len(ids), max_length)]


def count_preference_tokens(example: dict, tokenizer, chat_template: str) -> int:
    """Tokens of the prompt and its longer answer, as the preference trainers will render them."""
    longest = max(len(example["chosen"][-1]["content"]), len(example["rejected"][-1]["content"]))
    answer = next(m for m in (example["chosen"], example["rejected"]) if len(m[-1]["content"]) == longest)
    return len(tokenize_example(example["prompt"] + answer, tokenizer, chat_template)[0])
