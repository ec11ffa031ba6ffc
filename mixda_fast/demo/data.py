"""The demo's data, generated here (nothing is downloaded).

- **Knowledge base** (stage 1, the released code's prompt/targets format): invented people
  ("korvalen", "misuthar", ...), each with a favourite colour (one of four) stated in three
  phrasings: "the favourite colour of korvalen is {} ." -> ["green"] (optionally a home city too).
- **Task** (stage 2): "korvalen went to the shop to buy a new coat ." -> label "green", four
  classes. The sentence says nothing about the colour: only a model that holds the knowledge base
  can do better than chance. Train and test people are disjoint, so the classifier cannot
  memorise names from the task data; the train split is sampled k-shot per class.
- **General text** (the old-knowledge loss and the drift measure): sentences of Python's own
  documentation, ``pydoc_data.topics``, shipped with every CPython.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..training.corpora import general_sentences, make_people

__all__ = ["COLOURS", "CITIES", "DemoData", "make_people", "build_demo_data", "general_sentences"]

COLOURS = ["red", "blue", "green", "yellow"]
CITIES = ["paris", "london", "tokyo", "cairo", "lima", "oslo", "rome", "delhi"]
COLOUR_FACTS = ["the favourite colour of {name} is {{}} .", "{name} always wears {{}} clothes .",
                "{name} painted the house {{}} ."]
CITY_FACTS = ["{name} lives in {{}} ."]
TASK_TEMPLATES = ["{name} went to the shop to buy a new coat .", "{name} is choosing paint for the kitchen .",
                  "{name} picked a scarf for the winter ."]


@dataclass
class DemoData:
    knowledge: Path
    general_train: Path
    general_eval: Path
    task_train: Path
    task_test: Path
    people: list
    n_facts: int


def build_demo_data(out_dir, n_people: int = 96, n_test: int = 48, seed: int = 0,
                    general_train: int = 600, general_eval: int = 100, cities: bool = False) -> DemoData:
    """Write ``knowledge.json``, ``general_train.txt``, ``general_eval.txt``, ``task_train.jsonl``
    and ``task_test.jsonl`` into ``out_dir``; returns their paths. ``cities``: also a home-city
    fact per person (knowledge the task does not use)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    people = make_people(n_people, seed)
    colour = {p: COLOURS[i % len(COLOURS)] for i, p in enumerate(people)}
    city = {p: rng.choice(CITIES) for p in people}
    facts = []
    for p in people:
        facts += [{"prompt": t.format(name=p), "targets": [colour[p]]} for t in COLOUR_FACTS]
        if cities:
            facts += [{"prompt": t.format(name=p), "targets": [city[p]]} for t in CITY_FACTS]
    rng.shuffle(facts)
    knowledge = out / "knowledge.json"
    knowledge.write_text(json.dumps(facts, indent=1) + "\n")

    order = people[:]
    rng.shuffle(order)
    test_people, train_people = order[:n_test], order[n_test:]

    def task_rows(group):
        return [{"text": t.format(name=p), "label": colour[p]} for p in group for t in TASK_TEMPLATES]

    task_train, task_test = out / "task_train.jsonl", out / "task_test.jsonl"
    task_train.write_text("".join(json.dumps(r) + "\n" for r in task_rows(train_people)))
    task_test.write_text("".join(json.dumps(r) + "\n" for r in task_rows(test_people)))
    sents = general_sentences(general_train + general_eval, seed)
    g_train, g_eval = out / "general_train.txt", out / "general_eval.txt"
    g_train.write_text("\n".join(sents[:general_train]) + "\n")
    g_eval.write_text("\n".join(sents[general_train:]) + "\n")
    return DemoData(knowledge, g_train, g_eval, task_train, task_test, people, len(facts))
