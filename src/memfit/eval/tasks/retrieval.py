"""RULER-style needle retrieval: single needle, multi-key with distractors, multi-value, multi-query."""

from __future__ import annotations

import random

from memfit.eval.filler import TokenCounter, fill_to_length
from memfit.eval.tasks.base import Question, Sample

_ADJ = ["amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
        "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "vivid", "wild", "young", "zesty"]
_NOUN = ["anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchard", "pillow", "quarry", "rocket", "saddle", "tunnel",
         "violin", "wagon", "yarrow", "zephyr"]


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if k not in used:
            used.add(k)
            return k


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"The special magic number for {key} is: {value}."


def _question(key: str, values: list[str]) -> Question:
    if len(values) == 1:
        return Question(f"What is the special magic number for {key} mentioned in the text?", tuple(values),
                        f"The special magic number for {key} is")
    return Question(f"What are all the special magic numbers for {key} mentioned in the text?", tuple(values),
                    f"The special magic numbers for {key} are", lines=len(values))


def _make(task: str, seed: int, length: int, count: TokenCounter, keys: int, values: int, asked: int) -> Sample:
    rng = random.Random(f"{task}:{seed}:{length}")
    used: set[str] = set()
    pairs = [(_key(rng, used), [_value(rng) for _ in range(values)]) for _ in range(keys)]
    needles = [_needle(k, v) for k, vs in pairs for v in vs]
    text, depth = fill_to_length(rng, count, length, needles)
    questions = tuple(_question(k, vs) for k, vs in pairs[:asked])
    return Sample(task, length, seed, text, questions, {"depth": depth[: values * asked]})


def niah_single(seed: int, length: int, count: TokenCounter) -> Sample:
    """One needle in filler; ask for its value."""
    return _make("niah_single", seed, length, count, keys=1, values=1, asked=1)


def niah_multikey(seed: int, length: int, count: TokenCounter) -> Sample:
    """Three needles with different keys; ask for one (the others are distractors)."""
    return _make("niah_multikey", seed, length, count, keys=3, values=1, asked=1)


def niah_multivalue(seed: int, length: int, count: TokenCounter) -> Sample:
    """One key with two values in different places; both must be given."""
    return _make("niah_multivalue", seed, length, count, keys=1, values=2, asked=1)


# (statement, question, answer prefix) templates with one slot for a subject and one for the value:
# five different kinds of fact, so that the questions of one sample cannot be confused with each other
_FACTS = [
    ("The secret code of the {s} door is {v}.", "What is the secret code of the {s} door?", "The secret code of the {s} door is"),
    ("The locker number of {s} is {v}.", "What is the locker number of {s}?", "The locker number of {s} is"),
    ("The ticket number for the train to {s} is {v}.", "What is the ticket number for the train to {s}?",
     "The ticket number for the train to {s} is"),
    ("The serial number of the {s} statue is {v}.", "What is the serial number of the {s} statue?",
     "The serial number of the {s} statue is"),
    ("The phone extension of the {s} office is {v}.", "What is the phone extension of the {s} office?",
     "The phone extension of the {s} office is"),
]
_SUBJECTS = [
    ["red", "blue", "green", "yellow", "white", "black"],
    ["Anna", "Boris", "Chloe", "Daniel", "Emma", "Farid"],
    ["Paris", "Berlin", "Madrid", "Rome", "Warsaw", "Athens"],
    ["lion", "horse", "eagle", "bear", "swan", "wolf"],
    ["sales", "legal", "finance", "design", "support", "travel"],
]


def niah_multiquery(seed: int, length: int, count: TokenCounter) -> Sample:
    """Five facts of five different kinds; five questions asked one after another on the same
    compressed context (SCBench-style reuse: accuracy is reported per question position)."""
    rng = random.Random(f"niah_multiquery:{seed}:{length}")
    kinds = rng.sample(range(len(_FACTS)), len(_FACTS))
    facts = []
    for k in kinds:
        subject, value = rng.choice(_SUBJECTS[k]), _value(rng)
        statement, question, prefix = (t.format(s=subject, v=value) for t in _FACTS[k])
        facts.append((statement, Question(question, (value,), prefix)))
    text, depth = fill_to_length(rng, count, length, [f[0] for f in facts])
    return Sample("niah_multiquery", length, seed, text, tuple(q for _, q in facts), {"depth": depth})
