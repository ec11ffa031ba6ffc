"""The quality benchmark's data, generated here (nothing is downloaded).

- **Knowledge bases** about invented people, one per domain: each person has one attribute
  (domain "places": a home city of 20; domain "jobs": a profession of 12), stated in four
  phrasings. Three phrasings are trained; the fourth is held out, to see whether the knowledge
  went in or only the sentences did.
- **Task** (stage 2, domain "places"): "korvalen is packing a suitcase to fly home ." -> the
  person's home city. The sentence says nothing about the city: only a model that holds the
  knowledge base can beat chance. Train and test people are disjoint (``train_per_class`` and
  ``test_per_class`` people per city, three sentences each).
- **General text**: prose from ``pydoc_data.topics``, split into the text L_old trains on and
  held-out text for the drift and masked-LM-loss measures.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..training.corpora import general_sentences, make_people

__all__ = ["DOMAINS", "QualityData", "build_quality_data"]


@dataclass(frozen=True)
class Domain:
    values: tuple
    facts: tuple          # phrasings; the last is held out
    task: tuple = ()      # task sentences (the label is the value)


DOMAINS = {
    "places": Domain(
        values=("paris", "london", "tokyo", "cairo", "lima", "oslo", "rome", "delhi", "berlin", "madrid",
                "moscow", "dublin", "vienna", "sydney", "boston", "chicago", "athens", "prague", "seoul",
                "lisbon"),
        facts=("{name} lives in {{}} .", "the home town of {name} is {{}} .", "{name} grew up in {{}} .",
               "{name} has a small apartment in the centre of {{}} ."),
        task=("{name} is packing a suitcase to fly home .", "{name} sent a postcard to a friend back home .",
              "{name} misses the food of home .")),
    "jobs": Domain(
        values=("doctor", "teacher", "farmer", "pilot", "lawyer", "baker", "nurse", "painter", "singer",
                "writer", "driver", "chef"),
        facts=("{name} works as a {{}} .", "the job of {name} is {{}} .", "{name} has been a {{}} for ten years .",
               "every morning {name} goes to work as a {{}} .")),
}


@dataclass
class QualityData:
    knowledge: dict           # domain -> trained-phrasings file
    held_out: dict            # domain -> held-out-phrasing file
    general_train: Path
    general_eval: Path
    task_train: Path
    task_test: Path
    labels: list
    facts: dict               # domain -> number of trained facts


def _facts(value: dict, phrasings) -> list:
    return [{"prompt": t.format(name=p), "targets": [value[p]]} for p in value for t in phrasings]


def _write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return path


def build_quality_data(out_dir, *, classes: int = 20, train_per_class: int = 3, test_per_class: int = 2,
                       people_jobs: int = 60, general_train: int = 600, general_eval: int = 100,
                       seed: int = 0) -> QualityData:
    """Write both knowledge bases (trained and held-out phrasings), the task's train and test
    files and the general text into ``out_dir``. The task uses the first ``classes`` cities."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    places = DOMAINS["places"]
    labels = list(places.values[:classes])
    per_class = train_per_class + test_per_class
    people = make_people(classes * per_class, seed)
    city = {p: labels[i % classes] for i, p in enumerate(people)}
    jobs_people = make_people(people_jobs, seed + 1, exclude=people)
    job = {p: DOMAINS["jobs"].values[i % len(DOMAINS["jobs"].values)] for i, p in enumerate(jobs_people)}
    knowledge, held_out, facts = {}, {}, {}
    for name, value in (("places", city), ("jobs", job)):
        d = DOMAINS[name]
        rows = _facts(value, d.facts[:-1])
        rng.shuffle(rows)
        knowledge[name] = _write_json(out / f"knowledge_{name}.json", rows)
        held_out[name] = _write_json(out / f"knowledge_{name}_held_out.json", _facts(value, d.facts[-1:]))
        facts[name] = len(rows)
    order = people[:]
    rng.shuffle(order)
    train, test = [], []
    for label in labels:
        group = [p for p in order if city[p] == label]
        train += group[:train_per_class]
        test += group[train_per_class:]

    def task_rows(group):
        return "".join(json.dumps({"text": t.format(name=p), "label": city[p]}) + "\n"
                       for p in group for t in places.task)

    (out / "task_train.jsonl").write_text(task_rows(train))
    (out / "task_test.jsonl").write_text(task_rows(test))
    sents = general_sentences(general_train + general_eval, seed)
    (out / "general_train.txt").write_text("\n".join(sents[:general_train]) + "\n")
    (out / "general_eval.txt").write_text("\n".join(sents[general_train:]) + "\n")
    return QualityData(knowledge, held_out, out / "general_train.txt", out / "general_eval.txt",
                       out / "task_train.jsonl", out / "task_test.jsonl", labels, facts)
