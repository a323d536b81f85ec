"""A small fine-tuning task shipped with the tests: turn a sentence about a trip into a fixed JSON record.

    python tests/reference/make_finetune_task.py          # any Python 3; no dependencies; instant

Each example is {"prompt": "Record: <sentence>", "response": '{"name": "<person>", "city": "<city>"}'},
e.g. "Record: Last week Maria took the train to Lisbon." -> {"name": "Maria", "city": "Lisbon"}. The
prompt never names the format, so the pretrained (not instruction-tuned) 270M cannot follow it before
fine-tuning; after it, a greedy reply either matches FORMAT or not, and its two fields either equal the
sentence's person and city or not.

Deterministic from SEED: writes tests/fixtures/finetune/task_train.jsonl (TRAIN examples) and
task_eval.jsonl (EVAL held-out examples). Every held-out example names a person or a city (or both) that
no training example names, and no held-out (template, person, city) triple occurs in training.
"""

from __future__ import annotations

import json
import pathlib
import random

SEED = 20250317
TRAIN, EVAL = 320, 32
OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "finetune"
# what a tuned reply must match (tests/test_finetune_270m.py reads it from here)
FORMAT = r'\{"name": "([^"]+)", "city": "([^"]+)"\}'

NAMES = ["Maria", "Tom", "Aiko", "Pedro", "Fatima", "Lukas", "Chloe", "Ravi", "Ingrid", "Omar", "Sofia", "Daniel",
         "Mei", "Jonas", "Amara", "Victor", "Elena", "Kwame", "Hannah", "Mateo", "Yuki", "Noah", "Leila", "Pavel",
         "Grace", "Tariq", "Olga", "Samuel", "Nadia", "Felix", "Rosa", "Hugo", "Priya", "Anders", "Zainab", "Luca",
         "Irene", "Kenji", "Beatriz", "Malik"]
CITIES = ["Lisbon", "Paris", "Tokyo", "Nairobi", "Toronto", "Berlin", "Cairo", "Lima", "Oslo", "Madrid", "Seoul",
          "Dublin", "Hanoi", "Vienna", "Accra", "Chicago", "Prague", "Mumbai", "Sydney", "Bogota", "Istanbul",
          "Helsinki", "Manila", "Warsaw", "Quito", "Athens", "Lagos", "Denver", "Kyoto", "Zurich", "Havana",
          "Tunis", "Porto", "Montreal", "Jakarta", "Budapest", "Santiago", "Marrakesh", "Glasgow", "Osaka"]
HELD_OUT = 8  # the last 8 names and the last 8 cities occur only in held-out examples
TEMPLATES = [
    "{name} flew to {city} last spring.",
    "Last week {name} took the train to {city}.",
    "After years abroad, {name} finally moved back to {city}.",
    "{city} welcomed {name} for a conference in May.",
    "The postcard from {city} was signed by {name}.",
    "{name} is spending the summer in {city} with two friends.",
    "In {city}, {name} opened a small bakery near the station.",
    "Our new colleague {name} commutes from {city} every day.",
    "{name} has never been to {city}, but hopes to go soon.",
    "A letter arrived from {name}, who now lives in {city}.",
    "Tickets to {city} were cheap, so {name} booked two.",
    "The conference in {city} ended with a talk by {name}.",
]


def example(template: str, name: str, city: str) -> dict:
    return {"prompt": "Record: " + template.format(name=name, city=city),
            "response": json.dumps({"name": name, "city": city})}


def make(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen_names, new_names = NAMES[:-HELD_OUT], NAMES[-HELD_OUT:]
    seen_cities, new_cities = CITIES[:-HELD_OUT], CITIES[-HELD_OUT:]
    train, used = [], set()
    while len(train) < TRAIN:
        key = (rng.randrange(len(TEMPLATES)), rng.choice(seen_names), rng.choice(seen_cities))
        if key not in used:
            used.add(key)
            train.append(example(TEMPLATES[key[0]], key[1], key[2]))
    held = []
    for i in range(EVAL):  # a third new person, a third new city, a third both
        name = rng.choice(new_names if i % 3 != 1 else seen_names)
        city = rng.choice(new_cities if i % 3 != 0 else seen_cities)
        held.append(example(TEMPLATES[i % len(TEMPLATES)], name, city))
    return train, held


def main():
    train, held = make()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("task_train.jsonl", train), ("task_eval.jsonl", held)):
        with open(OUT / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{OUT / name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
