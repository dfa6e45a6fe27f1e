"""Writes the rlhf task: thank-you notes in two styles, and a preference for the warm one.

    python recipes/rlhf/make_data.py   # rewrites recipes/rlhf/data/*.jsonl

- sft.jsonl: prompts answered half in a warm style ("Thank you so much, Dana! ...") and half in a
  terse, formal one ("Received: one mug. Regards."), so the SFT policy writes both.
- preference.jsonl: the same kind of prompts with the warm note chosen and the terse one rejected.
- prompts.jsonl / held_out_prompts.jsonl: prompts only, for PPO; the held-out ones use names and
  items that never occur in any training file.

PPO then has something to find: the reward model learned to prefer warm notes, the policy writes
both, and raising the held-out reward means shifting toward the warm style (while the KL penalty
keeps it close to the SFT model). A test checks the shipped files equal this script's output.
"""

import json
import random
from pathlib import Path

NAMES = ["Dana", "Omar", "Lena", "Kofi", "Mira", "Tomas", "Aiko", "Pavel", "Nora", "Ravi", "Ines", "Jonas",
         "Leila", "Bruno", "Sofia", "Emeka", "Hana", "Marco", "Yara", "Felix"]
HELD_OUT_NAMES = ["Ada", "Tariq", "Elsa", "Diego", "Ingrid", "Kenji", "Amara", "Lucas"]
ITEMS = ["mug", "lamp", "scarf", "book", "candle", "basket", "kettle", "blanket", "plant", "teapot", "notebook", "umbrella"]
HELD_OUT_ITEMS = ["clock", "vase", "jacket", "puzzle"]
COLORS = ["red", "blue", "green", "yellow", "grey", "purple"]
ASKS = ["Write a short thank-you note to {name} for the {color} {item}.",
        "Thank {name} for the {color} {item} in one or two sentences.",
        "{name} sent me a {color} {item}. Write a brief thank-you message.",
        "Draft a quick note thanking {name} for the {color} {item}."]
WARM = ["Thank you so much, {name}! I love the {color} {item}, it made my day.",
        "Dear {name}, thank you for the beautiful {color} {item}! It was such a kind thought.",
        "{name}, thank you! The {color} {item} is wonderful and I will treasure it."]
TERSE = ["Received: one {color} {item}. Regards.",
         "Item received ({color} {item}). Noted.",
         "Confirming receipt of the {color} {item}."]


def prompt(rng, names, items):
    fields = {"name": rng.choice(names), "item": rng.choice(items), "color": rng.choice(COLORS)}
    return rng.choice(ASKS).format(**fields), fields


def main(out: Path = Path(__file__).parent / "data") -> None:
    rng = random.Random(0)
    out.mkdir(exist_ok=True)
    sft, pairs, prompts, held_out = [], [], [], []
    for i in range(200):
        ask, fields = prompt(rng, NAMES, ITEMS)
        style = WARM if i % 2 == 0 else TERSE
        sft.append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": rng.choice(style).format(**fields)}]})
    for _ in range(300):
        ask, fields = prompt(rng, NAMES, ITEMS)
        pairs.append({"prompt": ask, "chosen": rng.choice(WARM).format(**fields), "rejected": rng.choice(TERSE).format(**fields)})
    for _ in range(200):
        prompts.append({"prompt": prompt(rng, NAMES, ITEMS)[0]})
    for _ in range(32):
        held_out.append({"prompt": prompt(rng, HELD_OUT_NAMES, HELD_OUT_ITEMS)[0]})
    for name, rows in (("sft", sft), ("preference", pairs), ("prompts", prompts), ("held_out_prompts", held_out)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
