"""Write eval/tasks/data/quickstart_orders_mc.jsonl: each held-out quickstart order with its correct
JSON and three near misses (one field changed), for the log-likelihood task quickstart_orders_mc.

    python eval/tasks/make_quickstart_mc.py

Deterministic (fixed seed); a test checks the shipped file equals a fresh run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "recipes" / "data" / "quickstart" / "test.jsonl"
TARGET = HERE / "data" / "quickstart_orders_mc.jsonl"


def near_misses(answer: dict, pool: list[dict], rng: random.Random) -> list[dict]:
    """Three wrong answers, each differing from `answer` in one field (quantity, colour or city)."""
    colours = sorted({r["color"] for r in pool} - {answer["color"]})
    cities = sorted({r["city"] for r in pool} - {answer["city"]})
    return [answer | {"qty": answer["qty"] + rng.choice([-1, 1, 2]) or answer["qty"] + 3},
            answer | {"color": rng.choice(colours)},
            answer | {"city": rng.choice(cities)}]


def build() -> str:
    rng = random.Random(0)
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    answers = [json.loads(r["messages"][1]["content"]) for r in rows]
    out = []
    for row, answer in zip(rows, answers):
        choices = [answer, *near_misses(answer, answers, rng)]
        rng.shuffle(choices)
        out.append({"prompt": row["messages"][0]["content"], "choices": [json.dumps(c) for c in choices],
                    "label": choices.index(answer)})
    return "".join(json.dumps(r) + "\n" for r in out)


if __name__ == "__main__":
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(build())
    print(f"wrote {TARGET}")
