"""Text the project generates or finds on every machine (nothing is downloaded): invented entity
names for knowledge bases, and prose from Python's own documentation (``pydoc_data.topics``,
shipped with every CPython) for the old-knowledge loss and the drift measures."""

from __future__ import annotations

import random
import re

__all__ = ["make_people", "general_sentences"]

_ONSETS = ["k", "m", "t", "z", "v", "r", "l", "th", "s", "d", "b", "n", "p", "g", "f", "h"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m"]


def make_people(n: int, seed: int = 0, exclude=()) -> list[str]:
    """``n`` distinct invented three-syllable names, none of them in ``exclude``."""
    rng = random.Random(seed)
    names: set[str] = set(exclude)
    out = []
    while len(out) < n:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + \
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def general_sentences(limit: int, seed: int = 0) -> list[str]:
    """Prose sentences (6-30 words, no code) from ``pydoc_data.topics``, shuffled."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", re.sub(r"\n\s*\n", "\n\n", topics[key]))
        for sent in re.split(r"(?<=[.!?])\s+", text):
            words = sent.split()
            if 6 <= len(words) <= 30 and not re.search(r"[=*<>{}\[\]:|]{1}|::=|\*\*\*", sent):
                out.append(sent.strip().lower())
    out = list(dict.fromkeys(out))      # the topics repeat sentences: held-out text must not be trained text
    rng = random.Random(seed)
    rng.shuffle(out)
    return out[:limit]
