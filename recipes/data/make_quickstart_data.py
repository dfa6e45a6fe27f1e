"""Writes the shipped tasks. quickstart: turn a free-text shop order into one fixed-format JSON line;
intent: classify a customer message as order, cancel, complaint or tracking.

    python recipes/data/make_quickstart_data.py   # rewrites recipes/data/{quickstart,intent}/{train,test}.jsonl

The skill is checkable exactly (the answer is a single canonical string) and the base model lacks
it: asked plainly, it answers in prose or with its own keys. The held-out split uses customers
(first + last name pairs) that never occur in training, so passing it means extracting, not
remembering. A test checks the shipped files equal this script's output.
"""

import json
import random
from pathlib import Path

FIRST = ["Dana", "Omar", "Lena", "Kofi", "Mira", "Tomas", "Aiko", "Pavel", "Nora", "Ravi", "Ines", "Jonas",
         "Leila", "Bruno", "Sofia", "Emeka", "Hana", "Marco", "Yara", "Felix", "Ada", "Tariq", "Elsa", "Diego"]
LAST = ["Whitfield", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Haddad", "Silva", "Brennan",
        "Kowalski", "Mensah", "Ortega", "Varga", "Castell", "Ibsen", "Duarte", "Falk", "Quinn", "Rahman", "Sato"]
CITIES = ["Oslo", "Lyon", "Porto", "Lagos", "Kyoto", "Quito", "Tartu", "Cork", "Graz", "Leeds", "Pune",
          "Perth", "Bergen", "Malmo", "Split", "Gdansk", "Bilbao", "Nantes", "Aarhus", "Bremen"]
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange", "purple", "pink"]
ITEMS = ["mug", "lamp", "chair", "towel", "pillow", "notebook", "candle", "basket", "kettle", "blanket",
         "plate", "bottle", "jacket", "umbrella", "backpack"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight", 10: "ten", 12: "twelve"}
PHRASINGS = [
    "{name} wants {qty} {color} {items} shipped to {city}.",
    "Please send {qty} {color} {items} to {name} in {city}.",
    "Order from {name} ({city}): {qty} {color} {items}.",
    "{city} customer {name} ordered {qty} {color} {items}.",
    "Ship {qty} {items} in {color} to {city}, attention {name}.",
    "Hi, this is {name}. I'd like {qty} {color} {items} delivered to {city}, please.",
]
INSTRUCTION = "Convert this order to our JSON format:\n"


def make_row(rng: random.Random, name: str) -> dict:
    item, color, city = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES)
    qty = rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12])
    if qty == 1:
        said_qty, items = rng.choice(["a", "one"]), item
    else:
        said_qty, items = rng.choice([str(qty), NUMBER_WORDS[qty]]), item + "s"
    order = rng.choice(PHRASINGS).format(name=name, qty=said_qty, color=color, items=items, city=city)
    answer = json.dumps({"customer": name, "item": item, "color": color, "qty": qty, "city": city})
    return {"messages": [{"role": "user", "content": INSTRUCTION + order}, {"role": "assistant", "content": answer}]}


INTENTS = {
    "cancel": ["Please cancel my order of {qty} {color} {items}.", "I no longer need the {color} {items}, cancel it please.",
               "Stop the shipment of {qty} {items} to {city}, I changed my mind.", "Can you cancel the {items} I ordered for {city}?"],
    "complaint": ["The {qty} {color} {items} that arrived in {city} are damaged.", "My {color} {item} broke after one day.",
                  "You sent {qty} {items} but they are the wrong color, not {color}.", "The {items} I received in {city} smell strange."],
    "tracking": ["Where are my {qty} {color} {items}? They should be in {city} by now.", "Has the {color} {item} shipped yet?",
                 "Can I get a tracking number for the {items} going to {city}?", "When will the {qty} {items} reach {city}?"],
}


def make_intent_row(rng: random.Random, name: str) -> dict:
    label = rng.choice(["order", *INTENTS])
    if label == "order":
        return {"text": make_row(rng, name)["messages"][0]["content"].removeprefix(INSTRUCTION), "label": label}
    item, color, city = rng.choice(ITEMS), rng.choice(COLORS), rng.choice(CITIES)
    qty = rng.choice([2, 3, 4, 5, 6, 8, 10, 12])
    text = rng.choice(INTENTS[label]).format(qty=qty, color=color, items=item + "s", item=item, city=city)
    return {"text": f"{text} - {name}", "label": label}


def main(out_dir: Path = Path(__file__).parent, n_train: int = 400, n_test: int = 50) -> None:
    rng = random.Random(1234)
    names = [f"{first} {last}" for first in FIRST for last in LAST]
    rng.shuffle(names)
    test_names, train_names = names[:n_test], names[n_test:]
    tasks = {
        "quickstart": {"train": [make_row(rng, rng.choice(train_names)) for _ in range(n_train)],
                       "test": [make_row(rng, name) for name in test_names]},
        "intent": {"train": [make_intent_row(rng, rng.choice(train_names)) for _ in range(n_train)],
                   "test": [make_intent_row(rng, rng.choice(test_names)) for _ in range(2 * n_test)]},
    }
    for task, splits in tasks.items():
        (out_dir / task).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with (out_dir / task / f"{split}.jsonl").open("w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
