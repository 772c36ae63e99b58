"""The demo's built-in long document: generated filler prose with planted facts, and its questions."""

from __future__ import annotations

import random
from dataclasses import dataclass

_PLACES = ["the harbour", "the old mill", "the library", "the market square", "the north bridge", "the observatory",
           "the train station", "the botanical garden", "the town hall", "the museum", "the bakery", "the school"]
_PEOPLE = ["the mayor", "a fisherman", "the librarian", "two students", "an old carpenter", "the baker",
           "a travelling musician", "the night guard", "a young painter", "the postman", "the gardener"]
_ACTS = ["talked about the weather", "repaired a wooden fence", "counted the boats", "read the morning paper",
         "planted tulips along the path", "painted the shutters green", "walked slowly past the fountain",
         "sorted a box of old letters", "fed the pigeons", "swept the steps", "tuned a battered piano",
         "argued about the price of apples", "watched the clouds drift east", "carried bread to the neighbours"]
_TIMES = ["In the early morning", "Later that day", "Around noon", "Before sunset", "On most Tuesdays",
          "During the long winter", "Every spring", "After the festival", "At dawn", "In the evening"]
_DETAILS = ["The air smelled of salt and rain.", "Nobody seemed to be in a hurry.", "A bell rang somewhere far away.",
            "The streets were quiet and clean.", "Children laughed near the water.", "The lamps flickered on one by one.",
            "It was an ordinary day in the town.", "A cat slept on a warm windowsill.", "The river ran high and fast."]


@dataclass(frozen=True)
class Fact:
    statement: str
    question: str
    answer_prefix: str
    answer: str

    def is_correct(self, reply: str) -> bool:
        return self.answer.lower() in reply.lower()


def _facts(rng: random.Random) -> list[Fact]:
    code = str(rng.randint(1000, 9999))
    room = str(rng.randint(100, 899))
    year = str(rng.randint(1720, 1890))
    colour = rng.choice(["purple", "orange", "silver", "turquoise", "crimson"])
    name = rng.choice(["Elena Marsh", "Tobias Wren", "Greta Holm", "Oskar Lind", "Mira Castell"])
    city = rng.choice(["Lisbon", "Oslo", "Vienna", "Dublin", "Prague"])
    animal = rng.choice(["a tortoise", "a parrot", "a goat", "a hedgehog", "a donkey"])
    return [
        Fact(f"The secret code for the town vault is {code}.", "What is the secret code for the town vault?",
             "The secret code for the town vault is", code),
        Fact(f"The archive is kept in room {room} of the town hall.", "In which room of the town hall is the archive kept?",
             "The archive is kept in room", room),
        Fact(f"The lighthouse was built in the year {year}.", "In which year was the lighthouse built?",
             "The lighthouse was built in the year", year),
        Fact(f"The door of the observatory is painted {colour}.", "What colour is the door of the observatory?",
             "The door of the observatory is painted", colour),
        Fact(f"The harbour master is called {name}.", "What is the name of the harbour master?",
             "The harbour master is called", name),
        Fact(f"The mayor was born in {city}.", "In which city was the mayor born?", "The mayor was born in", city),
        Fact(f"The school keeps {animal} as a pet.", "What animal does the school keep as a pet?",
             "The school keeps", animal.split()[-1]),
    ]


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_TIMES)}, {rng.choice(_PEOPLE)} {rng.choice(_ACTS)} near {rng.choice(_PLACES)}."


def demo_document(num_sentences: int = 220, seed: int = 0) -> tuple[str, list[Fact]]:
    """A document of about 14 tokens per sentence (220 sentences: about 3K tokens) with the facts
    spread evenly through it, each in a paragraph of its own."""
    rng = random.Random(seed)
    facts = _facts(rng)
    paragraphs: list[str] = []
    slots = {round((i + 0.5) * num_sentences / len(facts)): f for i, f in enumerate(facts)}
    sentences: list[str] = []
    for i in range(num_sentences):
        if i in slots:
            if sentences:
                paragraphs.append(" ".join(sentences))
                sentences = []
            paragraphs.append(slots[i].statement)
        sentences.append(filler_sentence(rng) if rng.random() > 0.15 else rng.choice(_DETAILS))
        if len(sentences) >= 6:
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs), facts
